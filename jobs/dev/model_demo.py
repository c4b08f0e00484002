"""FiD, LUMEN and GLIMMER from one saved T5.1.1 checkpoint, side by side on a local Ray cluster.

Saves a tiny random T5.1.1 checkpoint (unless `checkpoint` points at an existing one), builds the
three readers from it with `GlimmerForConditionalGeneration.from_t5`, runs each as a Ray task on the
same random question and passages, and prints the reranker's choices, the greedy answer tokens and
the paper's FLOPs next to the FLOPs counted in the forward pass.

    python jobs/dev/model_demo.py --config jobs/dev/configs/model_demo.yaml
    ray job submit --working-dir . -- python jobs/dev/model_demo.py --config jobs/dev/configs/model_demo.yaml
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import ray
import torch

from glimmer_ray.cli import cluster_cpus, ray_session, write_report
from glimmer_ray.config import parse_job_args, to_dict
from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.model.flops import formula_flops, measure_reader_flops
from glimmer_ray.model.random_t5 import save_random_t5, t5_1_1_config


@dataclass
class TinyT5Config:
    vocab_size: int = 512  # tokens
    d_model: int = 96  # width d
    num_layers: int = 6  # L, encoder and decoder each
    num_heads: int = 4  # attention heads
    d_ff: int = 256  # gated feed-forward width (8 d / 3)


@dataclass
class ReaderConfig:
    name: str = "GLIMMER"  # label
    num_passages: int = 8  # k retrieved
    num_selected: int | None = 2  # m kept; null = no reranking
    live_proportion: float = 0.5  # alpha
    rerank_proportion: float = 0.34  # beta


def _default_readers() -> list[ReaderConfig]:
    return [
        ReaderConfig("FiD", 2, None, 1.0, 0.0),
        ReaderConfig("LUMEN", 4, None, 0.5, 0.0),
        ReaderConfig("GLIMMER", 8, 2, 0.5, 0.34),
    ]


@dataclass
class DemoConfig:
    checkpoint: str = "outputs/tiny-t5.1.1"  # T5 checkpoint directory; a random one is saved here if missing
    model: TinyT5Config = field(default_factory=TinyT5Config)  # shape of that random checkpoint
    readers: list[ReaderConfig] = field(default_factory=_default_readers)
    question_tokens: int = 12  # tokens per question
    passage_tokens: int = 40  # tokens per passage
    answer_tokens: int = 6  # greedy answer length (upper bound)
    seed: int = 0  # checkpoint and inputs
    ray_address: str | None = None  # null: join the cluster of `ray job submit`, or start a local one
    output: str = "outputs/model_demo.json"  # JSON written here


@ray.remote(num_cpus=1)
def run_reader(
    checkpoint: str, reader: dict, question: torch.Tensor, passages: torch.Tensor, answer_tokens: int
) -> dict:
    """Build one reader from the checkpoint and answer the question from its k passages."""
    torch.set_num_threads(1)
    model = GlimmerForConditionalGeneration.from_t5(
        checkpoint,
        live_proportion=reader["live_proportion"],
        rerank_proportion=reader["rerank_proportion"],
        num_selected=reader["num_selected"],
    ).eval()
    k = reader["num_passages"]
    question_ids, passage_ids = question[None], passages[None, :k]  # [1, lq], [1, k, lp]
    question_mask, passage_mask = torch.ones_like(question_ids), torch.ones_like(passage_ids)
    tokens, encoding = model.generate(
        question_ids, question_mask, passage_ids, passage_mask, max_new_tokens=answer_tokens
    )
    memory = model.encode_memory(passage_ids[0], passage_mask[0])[None]  # [1, k, lp, d], as served from a store
    measured = measure_reader_flops(
        model, question_ids, question_mask, memory, passage_mask, target_tokens=answer_tokens
    )
    formula = formula_flops(
        model.config, k, question_ids.shape[1] + passage_ids.shape[2], answer_tokens, question_ids.shape[1]
    )
    return {
        "name": reader["name"],
        "layers": [model.config.num_memory_layers, model.config.num_live_a_layers, model.config.num_live_b_layers],
        "rerank_scores": None
        if encoding.rerank_scores is None
        else [round(s, 3) for s in encoding.rerank_scores[0].tolist()],
        "selected": encoding.selected[0].tolist(),
        "answer_tokens": tokens[0, 1:].tolist(),
        "formula_flops": formula.as_dict(),
        "measured_flops": measured.as_dict(),
    }


def main(config: DemoConfig) -> list[dict]:
    # setup: the checkpoint, the inputs, the cluster
    if not os.path.isdir(config.checkpoint):
        save_random_t5(config.checkpoint, t5_1_1_config(**to_dict(config.model)), seed=config.seed)
        print(f"saved a random T5.1.1 checkpoint to {config.checkpoint}")
    checkpoint = os.path.abspath(config.checkpoint)
    generator = torch.Generator().manual_seed(config.seed)
    max_k = max(reader.num_passages for reader in config.readers)
    question = torch.randint(2, config.model.vocab_size, (config.question_tokens,), generator=generator)
    passages = torch.randint(2, config.model.vocab_size, (max_k, config.passage_tokens), generator=generator)

    # loop: one Ray task per reader
    with ray_session(config.ray_address):
        print(f"Ray cluster: {cluster_cpus():.0f} CPUs")
        futures = [
            run_reader.remote(checkpoint, to_dict(reader), question, passages, config.answer_tokens)
            for reader in config.readers
        ]
        results = ray.get(futures)

    # report
    baseline = results[0]["formula_flops"]["total"]
    print(
        f"\n{'reader':<9} {'k':>3} {'m':>3} {'mem/A/B':>8} {'formula MF':>10} {'measured MF':>11} {'vs ' + results[0]['name']:>7}  selected  answer tokens"
    )
    for reader, result in zip(config.readers, results):
        m = reader.num_selected or reader.num_passages
        print(
            f"{result['name']:<9} {reader.num_passages:>3} {m:>3} {'/'.join(map(str, result['layers'])):>8} "
            f"{result['formula_flops']['total'] / 1e6:10.2f} {result['measured_flops']['projections'] / 1e6:11.2f} "
            f"{result['formula_flops']['total'] / baseline:7.2f}  {result['selected']}  {result['answer_tokens']}"
        )
        if result["rerank_scores"] is not None:
            print(f"{'':<9} rerank scores of the {reader.num_passages} passages: {result['rerank_scores']}")
    print("MF: 1e6 FLOPs per example (multiply-add = 1); 'measured' counts the linear layers the formulas count.")
    write_report(config.output, {"config": to_dict(config), "results": results})
    return results


if __name__ == "__main__":
    main(parse_job_args(DemoConfig, __doc__.splitlines()[0], sys.argv[1:]))
