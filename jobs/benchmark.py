"""Quality against speed of FiD, LUMEN and GLIMMER (the paper's Figure 2), with GLIMMER's sweeps over k and m (Figures 3, 5).

    python jobs/benchmark.py --config jobs/configs/benchmark.yaml
    ray job submit --working-dir . -- python jobs/benchmark.py --config jobs/configs/benchmark.yaml

Every variant is a setting of the same trained reader (`glimmer_ray.eval.variants.reader_variant`) and answers the
same dev examples, side by side in one run: KILT exact match per task and on average, the reranker's recall@m,
the paper's formula FLOPs and the FLOPs counted in a real forward pass, and wall-clock per example and throughput
with passage memory pre-computed (as the memory store serves it; computing it is not timed). The timing is round-robin:
each of `timing_rounds` rounds passes every variant over its dev batches once, in an order rotated each round, and a
variant's time is its median round, so drift in a shared machine's load falls on all variants alike. Writes JSON and a
PNG of dev EM against time per example, like Figure 2.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import AutoTokenizer

from glimmer_ray.cli import write_report
from glimmer_ray.config import parse_job_args, to_dict
from glimmer_ray.data import synthkilt
from glimmer_ray.data.batches import model_inputs
from glimmer_ray.data.reading import ReadingConfig, load_reading
from glimmer_ray.data.stream import TokenizeConfig
from glimmer_ray.eval.evaluate import dev_batches, predict, score_predictions
from glimmer_ray.eval.metrics import prediction_recall
from glimmer_ray.eval.variants import VariantConfig, figure_2_variants, reader_variant
from glimmer_ray.memory.build import MemoryEncoder
from glimmer_ray.memory.store import pad_memories
from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.model.flops import formula_flops, measure_reader_flops


def _sweeps() -> list[VariantConfig]:
    """GLIMMER over k with m = 5 (Figure 3) and over m with k = 25 (Figure 5)."""
    by_k = [VariantConfig(f"GLIMMER k={k} m=5", k, 5, 1 / 3, 0.25) for k in (5, 10, 15)]
    by_m = [VariantConfig(f"GLIMMER k=25 m={m}", 25, m, 1 / 3, 0.25) for m in (1, 3, 10)]
    return by_k + by_m


@dataclass
class BenchmarkConfig:
    data_dir: str = "outputs/quickstart"  # jobs/prepare_data.py output (retrieved/ with >= 25 passages per example)
    model_dir: str = "outputs/quickstart/model"  # trained reader + tokenizer
    variants: list[VariantConfig] = field(default_factory=figure_2_variants)  # Figure 2; the first is the baseline
    sweeps: list[VariantConfig] = field(default_factory=_sweeps)  # Figures 3 and 5
    tasks: list[str] = field(default_factory=lambda: list(synthkilt.TASKS))
    limit_per_task: int | None = 60  # dev examples per task; null = all
    batch_size: int = 8  # examples per call
    timing_rounds: int = 3  # round-robin passes over every variant; each variant's time is its median pass
    threads: int = 0  # torch threads; 0 = torch's default
    output: str = "outputs/quickstart/benchmark.json"  # JSON; the PNG is written next to it
    plot: bool = True  # write <output>.png


class PrecomputedMemory:
    """Memory of every dev passage, computed once by the variant's own memory encoder (not timed)."""

    def __init__(
        self,
        model: GlimmerForConditionalGeneration,
        tokenizer,
        passages: dict[str, tuple[str, str]],
        passage_tokens: int,
    ) -> None:
        encoder = MemoryEncoder(model, tokenizer, passage_tokens, device="cpu")
        ids = sorted(passages)
        memories = encoder.encode([passages[p][0] for p in ids], [passages[p][1] for p in ids])
        self.memory = dict(zip(ids, memories))
        self.width = model.config.d_model

    def fetch(self, passage_ids: list[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return pad_memories([self.memory[p] for p in passage_ids], self.width, length)


def _dev_passages(config: BenchmarkConfig, k: int) -> dict[str, tuple[str, str]]:
    passages = {}
    for task in config.tasks:
        rows = pq.read_table(
            os.path.join(config.data_dir, "retrieved", f"{task}-dev.parquet"),
            columns=["passage_ids", "passage_titles", "passage_texts"],
        ).to_pylist()
        for row in rows[: config.limit_per_task] if config.limit_per_task else rows:
            passages.update(
                {
                    pid: (title, text)
                    for pid, title, text in zip(
                        row["passage_ids"][:k], row["passage_titles"][:k], row["passage_texts"][:k]
                    )
                }
            )
    return passages


def _prepare_variant(
    base: GlimmerForConditionalGeneration,
    tokenizer,
    reading: ReadingConfig,
    variant: VariantConfig,
    config: BenchmarkConfig,
) -> dict:
    """The variant's reader, its pre-computed memory and its tokenised dev batches, warmed up by one call (not timed)."""
    model = reader_variant(base, variant)
    memory = PrecomputedMemory(model, tokenizer, _dev_passages(config, variant.num_passages), reading.passage_tokens)
    paths = {task: os.path.join(config.data_dir, "retrieved", f"{task}-dev.parquet") for task in config.tasks}
    tokenize = TokenizeConfig.as_trained(reading, variant.num_passages)
    batches = list(
        dev_batches(
            paths, os.path.join(config.data_dir, "tokenizer"), tokenize, config.batch_size, config.limit_per_task
        )
    )
    predict(model, batches[:1], tokenizer, max_new_tokens=reading.answer_tokens, memory=memory)  # warm-up
    return {
        "variant": variant,
        "reading": reading,
        "model": model,
        "memory": memory,
        "batches": batches,
        "seconds": [],
        "predictions": None,
    }


def _timed_pass(prepared: dict, tokenizer, config: BenchmarkConfig) -> None:
    """One timed pass of the variant over its dev batches; the first pass's predictions are kept (greedy: all passes agree)."""
    start = time.perf_counter()
    predictions = predict(
        prepared["model"],
        prepared["batches"],
        tokenizer,
        max_new_tokens=prepared["reading"].answer_tokens,
        memory=prepared["memory"],
    )
    prepared["seconds"].append(time.perf_counter() - start)
    if prepared["predictions"] is None:
        prepared["predictions"] = predictions


def _summarise(prepared: dict, tokenizer, config: BenchmarkConfig) -> dict:
    """Quality, FLOPs (formula and counted) and the median round's time of one variant."""
    model, variant, predictions = prepared["model"], prepared["variant"], prepared["predictions"]
    scores = score_predictions(predictions)
    seconds = float(np.median(prepared["seconds"]))
    inputs = model_inputs(prepared["batches"][0], torch.device("cpu"), eos_token_id=tokenizer.eos_token_id)
    one = {key: value[:1] for key, value in inputs.items()}
    with torch.no_grad():
        passage_memory = model.encode_memory(one["passage_ids"][0], one["passage_mask"][0])[None]  # [1, k, lp, d]
    measured = measure_reader_flops(
        model,
        one["question_ids"],
        one["question_mask"],
        passage_memory,
        one["passage_mask"],
        prepared["reading"].answer_tokens,
    )
    pair_tokens = int(one["question_mask"].sum() + one["passage_mask"][0].sum(-1).float().mean())
    formula = formula_flops(
        model.config,
        variant.num_passages,
        pair_tokens,
        prepared["reading"].answer_tokens,
        int(one["question_mask"].sum()),
    )
    return {
        "variant": to_dict(variant),
        "layers": {
            "memory": model.config.num_memory_layers,
            "live_a": model.config.num_live_a_layers,
            "live_b": model.config.num_live_b_layers,
        },
        "em": {task: scores[task]["em"] for task in list(config.tasks) + ["average"]},
        "f1_average": scores["average"]["f1"],
        "recall_at_m": prediction_recall(predictions),
        "formula_flops": formula.total,
        "measured_flops": measured.total,
        "seconds_per_example": seconds / len(predictions),
        "examples_per_second": len(predictions) / seconds,
        "seconds_per_round": prepared["seconds"],
        "examples": len(predictions),
    }


def _plot(results: list[dict], sweeps: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for result, marker in zip(results, ("o", "s", "*")):
        axis.scatter(
            1e3 * result["seconds_per_example"],
            result["em"]["average"],
            s=90,
            marker=marker,
            label=result["variant"]["name"],
            zorder=3,
        )
    if sweeps:
        axis.scatter(
            [1e3 * r["seconds_per_example"] for r in sweeps],
            [r["em"]["average"] for r in sweeps],
            s=25,
            c="grey",
            label="GLIMMER sweeps (k, m)",
        )
        for r in sweeps:
            axis.annotate(
                r["variant"]["name"].replace("GLIMMER ", ""),
                (1e3 * r["seconds_per_example"], r["em"]["average"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    axis.set_xlabel("time per example (ms, memory pre-computed)")
    axis.set_ylabel("dev exact match (average over tasks)")
    axis.set_title("Quality vs speed on one trained reader (cf. GLIMMER Figure 2)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(config: BenchmarkConfig) -> dict:
    # setup
    if config.timing_rounds < 1:
        raise SystemExit(f"timing_rounds must be >= 1, got {config.timing_rounds}")
    if not config.variants:
        raise SystemExit("variants must hold at least one setting (the first is the baseline of the ratios)")
    if config.threads:
        torch.set_num_threads(config.threads)
    base = GlimmerForConditionalGeneration.from_pretrained(config.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    reading = load_reading(config.model_dir)  # the token lengths it was trained with
    results: dict = {"config": to_dict(config), "model": config.model_dir, "variants": [], "sweeps": []}

    # loop: every setting on the same weights and examples, timed round-robin
    groups = [
        (group, variant)
        for group, variants in (("variants", config.variants), ("sweeps", config.sweeps))
        for variant in variants
    ]
    prepared = [_prepare_variant(base, tokenizer, reading, variant, config) for _, variant in groups]
    for round_index in range(config.timing_rounds):
        shift = round_index % len(prepared)
        for item in prepared[shift:] + prepared[:shift]:
            _timed_pass(item, tokenizer, config)
        print(
            f"[benchmark] round {round_index + 1}/{config.timing_rounds}: "
            + ", ".join(f"{item['variant'].name} {item['seconds'][-1]:.2f} s" for item in prepared),
            flush=True,
        )
    for (group, variant), item in zip(groups, prepared):
        result = _summarise(item, tokenizer, config)
        results[group].append(result)
        print(
            f"[benchmark] {variant.name}: EM {result['em']['average']:.3f}, {1e3 * result['seconds_per_example']:.1f} ms/example",
            flush=True,
        )

    # report
    baseline = results["variants"][0]
    header = (
        ["setting", "mem/A/B", "EM avg"]
        + [t[:7] for t in config.tasks]
        + ["R@m", "formula MF", "measured MF", "ms/ex", "ex/s", "FLOPs/FiD", "time/FiD"]
    )
    print("\n" + "".join(f"{h:>11}" if i else f"{h:<20}" for i, h in enumerate(header)))
    for result in results["variants"] + results["sweeps"]:
        layers = result["layers"]
        cells = [
            result["variant"]["name"],
            f"{layers['memory']}/{layers['live_a']}/{layers['live_b']}",
            f"{result['em']['average']:.3f}",
        ]
        cells += [f"{result['em'][t]:.3f}" for t in config.tasks]
        cells += [
            f"{result['recall_at_m']:.3f}",
            f"{result['formula_flops'] / 1e6:.2f}",
            f"{result['measured_flops'] / 1e6:.2f}",
            f"{1e3 * result['seconds_per_example']:.1f}",
            f"{result['examples_per_second']:.1f}",
            f"{result['formula_flops'] / baseline['formula_flops']:.3f}",
            f"{result['seconds_per_example'] / baseline['seconds_per_example']:.3f}",
        ]
        print("".join(f"{c:>11}" if i else f"{c:<20}" for i, c in enumerate(cells)))
    print(
        "(EM: KILT exact match on dev; R@m: the read passages (m kept, or all k without reranking) cover a gold evidence set; "
        "MF: million FLOPs per example, multiply-add = 1; formula includes the question's memory pass; "
        f"time: the median of {config.timing_rounds} round-robin passes)"
    )
    write_report(config.output, results)
    if config.plot:
        _plot(results["variants"], results["sweeps"], os.path.splitext(config.output)[0] + ".png")
        print(f"wrote {os.path.splitext(config.output)[0] + '.png'}")
    return results


if __name__ == "__main__":
    main(parse_job_args(BenchmarkConfig, __doc__.splitlines()[0], sys.argv[1:]))
