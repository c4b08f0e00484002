"""Probe a trained reader's reranker alone: can its first live layers and scoring head learn to rank the k passages?

    python jobs/dev/probe_reranker.py --config jobs/dev/configs/probe_reranker.yaml
    ray job submit --working-dir . -- python jobs/dev/probe_reranker.py --config jobs/dev/configs/probe_reranker.yaml

The memory of every question and passage, and the perplexity-distillation teacher's scores, are computed once with
the reader frozen. Then, for each target in `targets`, a copy of the reader trains only live stage A and the rerank
head on those cached inputs: `teacher` distils the teacher's ranking (the paper's loss, as jobs/train.py), `gold`
learns KILT's gold provenance (the passages stating the answer) instead, and `corpus` needs no labels at all: an
inverse-cloze task on the passages (the query is a sentence naming a candidate's subject, taken from its text; the
target is every candidate holding that sentence), a self-supervised matching signal on the knowledge source. Side by side in one run, on the same cached
data, this tells whether the scorer cannot learn to match a question to its passage, or learns it from gold
provenance but not from this teacher. Passage recall@m per task, at every evaluation, is printed and written to
`<output_dir>/metrics.json`, with the retriever's and the teacher's own recall@m on the same examples. Nothing is exported.
Variants of the scorer: `rerank_proportion` moves the split of the live layers (1.0: all before the scorer), `scoring`
switches first-token and mean-pool reading, `head_norm` puts an RMSNorm before the head.
"""

from __future__ import annotations

import copy
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import AutoTokenizer

from glimmer_ray.cli import write_report
from glimmer_ray.config import parse_job_args, to_dict
from glimmer_ray.data import synthkilt
from glimmer_ray.data.batches import model_inputs
from glimmer_ray.data.reading import load_reading, parse_passage_text, question_text
from glimmer_ray.data.stream import TokenizeConfig
from glimmer_ray.eval.evaluate import dev_batches
from glimmer_ray.eval.metrics import reranker_recall
from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.model.configuration import SCORING_METHODS
from glimmer_ray.model.modeling import RerankHead, perplexity_distillation_loss

TARGETS = ("teacher", "gold", "corpus")


@dataclass
class ProbeConfig:
    model: str = "outputs/quickstart/model-learning"  # GLIMMER export of jobs/train.py (must rerank: num_selected < k)
    data_dir: str = "outputs/quickstart"  # jobs/prepare_data.py output: retrieved/ and tokenizer/
    train_dirs: list[str] = field(
        default_factory=list
    )  # more prepared directories whose training examples join data_dir's
    tasks: list[str] = field(default_factory=lambda: list(synthkilt.TASKS))
    targets: list[str] = field(
        default_factory=lambda: ["teacher", "gold"]
    )  # teacher | gold | corpus, each from the same start
    train_limit_per_task: int | None = 200  # training examples per task per directory; null = all
    dev_limit_per_task: int | None = None  # dev examples per task; null = all
    steps: int = 300  # optimiser steps per target
    batch_size: int = 16  # examples per step
    learning_rate: float = 0.001  # AdamW, constant
    temperature: float = 0.1  # tau of both losses
    rerank_proportion: float | None = (
        None  # null: as trained | beta, the share of live layers before the scorer (1.0: all)
    )
    scoring: str | None = None  # null: as trained | first_token | mean_pool (the head's linear layer kept either way)
    head_norm: bool = False  # an RMSNorm before the head (a trainable copy of the encoder's final layer norm)
    eval_every_steps: int = 100  # dev (and training-probe) recall interval
    output_dir: str = "outputs/quickstart/probe-reranker"  # metrics.json
    seed: int = 0


class NormedRerankHead(nn.Module):
    """The reader's RerankHead over RMSNorm-ed live stage A states (T5 blocks leave the residual stream unnormalised)."""

    def __init__(self, norm: nn.Module, head: RerankHead) -> None:
        super().__init__()
        self.norm = norm
        self.head = head

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor, retrieval_scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        """hidden [n, l, d], mask [n, l], retrieval_scores [n] (with a retrieval prior) -> scores [n]."""
        return self.head(self.norm(hidden), mask, retrieval_scores)


def probe_head(model, scoring: str | None, head_norm: bool) -> nn.Module:
    """A copy of the reader's head for the probe to train: its pooling overridden and an RMSNorm before it if asked."""
    head = copy.deepcopy(model.rerank_head)
    if scoring is not None:
        head.scoring = scoring
    return NormedRerankHead(copy.deepcopy(model.encoder.final_layer_norm), head) if head_norm else head


def gold_in_candidates(batch: dict) -> torch.Tensor:
    """[b, k]: 1 where a retrieved passage holds an item of a gold evidence set (KILT provenance at passage level)."""
    rows = []
    for keys, gold in zip(batch["passage_keys"], batch["gold_passages"]):
        evidence = json.loads(gold) if isinstance(gold, str) else gold
        wanted = {passage for evidence_set in evidence for item in evidence_set for passage in item}
        rows.append([float(str(key) in wanted) for key in keys])
    return torch.tensor(rows)


def gold_loss(scores: torch.Tensor, gold: torch.Tensor, temperature: float) -> torch.Tensor | None:
    """KL( gold spread evenly || softmax(scores / tau) ) over the rows with a gold passage among the k; None if none has."""
    keep = gold.sum(-1) > 0
    if not keep.any():
        return None
    target = gold[keep] / gold[keep].sum(-1, keepdim=True)
    return F.kl_div(F.log_softmax(scores[keep].float() / temperature, dim=-1), target, reduction="batchmean")


@torch.no_grad()
def cache_inputs(
    model,
    paths_by_dir: list[dict[str, str]],
    tokenizer_dir: str,
    tokenize: TokenizeConfig,
    batch_size: int,
    limit: int | None,
    desc: str,
) -> list[dict]:
    """Tokenised batches with their question and passage memory and the teacher's scores, computed once (reader frozen)."""
    cpu = torch.device("cpu")
    batches = [
        batch for paths in paths_by_dir for batch in dev_batches(paths, tokenizer_dir, tokenize, batch_size, limit)
    ]
    cached = []
    for batch in tqdm(batches, desc=desc, unit="batch", file=sys.stdout, mininterval=10):
        inputs = model_inputs(batch, cpu)
        cached.append(
            {
                "task": [str(task) for task in batch["task"]],
                "passage_keys": batch["passage_keys"],
                "gold_passages": batch["gold_passages"],
                "question_mask": inputs["question_mask"],
                "passage_mask": inputs["passage_mask"],
                "passage_ids": inputs["passage_ids"],  # [b, k, lp], for the corpus target's queries
                "question_memory": model.encode_question(inputs["question_ids"], inputs["question_mask"]),  # [b, lq, d]
                "passage_memory": model.encode_memory(
                    inputs["passage_ids"].flatten(0, 1), inputs["passage_mask"].flatten(0, 1)
                ).unflatten(0, inputs["passage_ids"].shape[:2]),  # [b*k, lp, d] -> [b, k, lp, d]
                "teacher": model.passage_log_likelihood(
                    inputs["question_ids"],
                    inputs["question_mask"],
                    inputs["passage_ids"],
                    inputs["passage_mask"],
                    None,
                    inputs["labels"],
                ),  # [b, k]
                "gold": gold_in_candidates(batch),  # [b, k]
            }
        )
    return cached


def subject_sentences(passage: str) -> list[str]:
    """The sentences of a decoded "title: T context: text" passage that name its subject T (all of them if none does)."""
    title, body = parse_passage_text(passage)
    sentences = [sentence.strip() for sentence in body.split(". ") if len(sentence.split()) >= 3]
    return [sentence for sentence in sentences if title and title in sentence] or sentences


class CorpusQueries:
    """Inverse-cloze queries over the cached candidates: for each example a random candidate, a random sentence of it
    naming its subject as the query (with the example's task prefix), and as targets every candidate holding it."""

    def __init__(self, tokenizer_dir: str, question_tokens: int, seed: int) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.question_tokens = question_tokens
        self.rng = random.Random(seed)

    def _decoded(self, batch: dict) -> list[list[str]]:
        """[b][k] passages as the reader saw them (decoded from the cached tokens), kept in the cached batch once decoded."""
        if "passage_texts" not in batch:
            ids = batch["passage_ids"]  # [b, k, lp]
            flat = self.tokenizer.batch_decode(ids.reshape(-1, ids.shape[-1]), skip_special_tokens=True)  # [b*k]
            batch["passage_texts"] = [
                flat[row * ids.shape[1] : (row + 1) * ids.shape[1]] for row in range(ids.shape[0])
            ]
        return batch["passage_texts"]

    def queries(self, batch: dict) -> tuple[list[str], list[int], torch.Tensor]:
        """(query texts, the rows they belong to, targets [b', k]) for the rows with a usable sentence."""
        queries, rows, targets = [], [], []
        for row, (task, passages) in enumerate(zip(batch["task"], self._decoded(batch))):
            sentences = subject_sentences(self.rng.choice(passages))
            if not sentences:
                continue
            sentence = self.rng.choice(sentences)
            queries.append(question_text(task, sentence))
            rows.append(row)
            targets.append([float(sentence in passage) for passage in passages])
        return queries, rows, torch.tensor(targets).reshape(len(rows), -1)

    @torch.no_grad()
    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor] | None:
        """(question memory [b', lq, d], question mask [b', lq], the rows used, targets [b', k]); None if no row has a sentence."""
        queries, rows, targets = self.queries(batch)
        if not rows:
            return None
        encoded = self.tokenizer(
            queries, max_length=self.question_tokens, truncation=True, padding="max_length", return_tensors="pt"
        )
        mask = encoded["attention_mask"]
        return model.encode_question(encoded["input_ids"], mask), mask, rows, targets


def probe_loss(
    model, target: str, batch: dict, corpus: CorpusQueries | None, temperature: float
) -> torch.Tensor | None:
    """The target's loss on one cached batch; None when the batch has nothing to learn (no gold passage or sentence)."""
    if target == "corpus":
        queries = corpus(model, batch)
        if queries is None:
            return None
        question_memory, question_mask, rows, wanted = queries
        scores = model.live_encode(
            question_memory, question_mask, batch["passage_memory"][rows], batch["passage_mask"][rows]
        ).rerank_scores
        return gold_loss(scores, wanted, temperature)
    scores = rerank_scores(model, batch)  # [b, k]
    if target == "teacher":
        return perplexity_distillation_loss(scores, batch["teacher"], temperature)
    return gold_loss(scores, batch["gold"], temperature)


def rerank_scores(model, batch: dict) -> torch.Tensor:
    """[b, k] scores of live stage A + the head over the cached memory."""
    return model.live_encode(
        batch["question_memory"], batch["question_mask"], batch["passage_memory"], batch["passage_mask"]
    ).rerank_scores


@torch.no_grad()
def recall_by_task(batches: list[dict], num_selected: int, ranking) -> dict[str, float]:
    """Passage recall@m per task (the kept passages cover a gold evidence set) of `ranking(batch) -> [b, m] indices`."""
    hits: dict[str, float] = {}
    counts: dict[str, int] = {}
    for batch in batches:
        selected = ranking(batch)
        for row, task in enumerate(batch["task"]):
            hit = reranker_recall(
                selected[row : row + 1],
                batch["passage_keys"][row : row + 1],
                batch["gold_passages"][row : row + 1],
                "passage",
            )
            hits[task] = hits.get(task, 0.0) + hit
            counts[task] = counts.get(task, 0) + 1
    return {task: hits[task] / counts[task] for task in sorted(counts)}


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / max(1, len(values))


def evaluate(
    model, target: str, step: int, losses: list[float], dev: list[dict], train_probe: list[dict], num_selected: int
) -> dict:
    """Dev passage recall@m per task and the training probe's mean, printed as one line; the model back in training mode."""
    model.eval()

    def ranking(batch: dict) -> torch.Tensor:
        return torch.topk(rerank_scores(model, batch), num_selected, dim=1).indices

    row = {
        "step": step,
        "loss": sum(losses) / len(losses) if losses else None,
        "dev": recall_by_task(dev, num_selected, ranking),
        "train": _mean(recall_by_task(train_probe, num_selected, ranking)),
    }
    model.train()
    loss_text = f"loss {row['loss']:.3f}" if row["loss"] is not None else "loss   -  "
    print(
        f"[{target}] step {step:4d} {loss_text} passage R@{num_selected}: dev mean {_mean(row['dev']):.3f} "
        + " ".join(f"{task} {value:.3f}" for task, value in row["dev"].items())
        + f" | training probe {row['train']:.3f}",
        flush=True,
    )
    return row


def main(config: ProbeConfig) -> dict:
    # setup
    unknown = [target for target in config.targets if target not in TARGETS]
    if unknown or not config.targets:
        raise SystemExit(f"targets must be a non-empty list of {list(TARGETS)}, got {config.targets}")
    if config.scoring is not None and config.scoring not in SCORING_METHODS:
        raise SystemExit(f"scoring must be null or one of {list(SCORING_METHODS)}, got {config.scoring!r}")
    if config.rerank_proportion is not None and not 0.0 < config.rerank_proportion <= 1.0:
        raise SystemExit(f"rerank_proportion must be null or in (0, 1], got {config.rerank_proportion}")
    if config.steps < 1 or config.eval_every_steps < 1:
        raise SystemExit(f"steps and eval_every_steps must be >= 1, got {config.steps} and {config.eval_every_steps}")
    if not os.path.isdir(config.model):
        raise SystemExit(f"model directory not found: {config.model} (a GLIMMER export of jobs/train.py)")
    torch.manual_seed(config.seed)
    split = {} if config.rerank_proportion is None else {"rerank_proportion": config.rerank_proportion}
    base = GlimmerForConditionalGeneration.from_pretrained(config.model, **split).eval()
    reading = load_reading(config.model)  # the token lengths and k it was trained with
    m = base.config.num_selected
    if m is None or m >= reading.num_passages:
        raise SystemExit(
            f"{config.model} does not rerank (num_selected {m} of k = {reading.num_passages}); probe a GLIMMER reader with m < k"
        )
    tokenize = TokenizeConfig.as_trained(reading)
    tokenizer_dir = os.path.join(config.data_dir, "tokenizer")

    def paths(directory: str, split: str) -> dict[str, str]:
        found = {task: os.path.join(directory, "retrieved", f"{task}-{split}.parquet") for task in config.tasks}
        missing = [path for path in found.values() if not os.path.exists(path)]
        if missing:
            raise SystemExit(f"{directory} has no retrieved {split} file {missing[0]}: run jobs/prepare_data.py for it")
        return found

    started = time.time()
    train = cache_inputs(
        base,
        [paths(d, "train") for d in [config.data_dir, *config.train_dirs]],
        tokenizer_dir,
        tokenize,
        config.batch_size,
        config.train_limit_per_task,
        "caching training memory + teacher",
    )
    dev = cache_inputs(
        base,
        [paths(config.data_dir, "dev")],
        tokenizer_dir,
        tokenize,
        config.batch_size,
        config.dev_limit_per_task,
        "caching dev memory + teacher",
    )
    cache_seconds = time.time() - started
    print(
        f"cached {sum(len(b['task']) for b in train)} training and {sum(len(b['task']) for b in dev)} dev examples in {cache_seconds:.0f} s",
        flush=True,
    )
    train_probe = train[:: max(1, len(train) // 24)]  # ~24 training batches, to tell fitting from carrying over
    reference = {
        "retriever": recall_by_task(dev, m, lambda b: torch.arange(m).expand(len(b["task"]), m)),
        "teacher": recall_by_task(dev, m, lambda b: torch.topk(b["teacher"], m, dim=1).indices),
    }

    if "gold" in config.targets and not any(batch["gold"].any() for batch in train):
        raise SystemExit(
            "no training example has a gold passage among its k retrieved: the gold target has nothing to learn"
        )

    # loop: one probe per target, each from the reader's own weights
    results = {}
    for target in config.targets:
        model = copy.deepcopy(base)
        model.rerank_head = probe_head(model, config.scoring, config.head_norm)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        trainable = [p for block in model.live_a_blocks for p in block.parameters()] + list(
            model.rerank_head.parameters()
        )
        for parameter in trainable:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.01)
        rng = random.Random(config.seed)
        corpus = CorpusQueries(tokenizer_dir, reading.question_tokens, config.seed) if target == "corpus" else None

        history = [evaluate(model, target, 0, [], dev, train_probe, m)]
        losses: list[float] = []
        step, target_started = 0, time.time()
        while step < config.steps:
            order = list(range(len(train)))
            rng.shuffle(order)
            for index in order:
                batch = train[index]
                loss = probe_loss(model, target, batch, corpus, config.temperature)
                if loss is None:
                    continue
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                losses.append(loss.item())
                step += 1
                if step % config.eval_every_steps == 0 or step == config.steps:
                    history.append(
                        evaluate(model, target, step, losses[-config.eval_every_steps :], dev, train_probe, m)
                    )
                    if step == config.steps:
                        break
        results[target] = {"history": history, "seconds": time.time() - target_started}

    # cleanup: the table and metrics.json
    tasks = list(reference["retriever"])
    print(f"\n{'passage R@' + str(m) + ' (dev)':<26}" + "".join(f"{t[:8]:>9}" for t in tasks) + f"{'mean':>9}")
    rows = [(f"retriever (first {m})", reference["retriever"]), ("teacher (its top m)", reference["teacher"])]
    rows.append(
        ("scorer, step 0", results[config.targets[0]]["history"][0]["dev"])
    )  # every target starts from these weights
    for target, result in results.items():
        rows.append((f"{target}-trained, step {result['history'][-1]['step']}", result["history"][-1]["dev"]))
    for name, values in rows:
        print(f"{name:<26}" + "".join(f"{values[t]:9.3f}" for t in tasks) + f"{_mean(values):9.3f}")
    head = (
        f"{base.config.num_live_a_layers} live layer(s) before the scorer, {config.scoring or base.config.scoring} scoring"
        + (", RMSNorm before the head" if config.head_norm else "")
    )
    print(
        f"(the reader's memory frozen; only live stage A and the rerank head train, {config.steps} steps of {config.batch_size} per target; {head})"
    )
    metrics = {
        "config": to_dict(config),
        "num_selected": m,
        "num_live_a_layers": base.config.num_live_a_layers,
        "cache_seconds": cache_seconds,
        "train_examples": sum(len(b["task"]) for b in train),
        "dev_examples": sum(len(b["task"]) for b in dev),
        "dev_reference": reference,
        "targets": results,
    }
    write_report(os.path.join(config.output_dir, "metrics.json"), metrics)
    return metrics


if __name__ == "__main__":
    main(parse_job_args(ProbeConfig, __doc__.splitlines()[0], sys.argv[1:]))
