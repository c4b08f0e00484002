"""What perplexity distillation costs a training step: the same GLIMMER step (forward, backward, AdamW) timed
with and without the distillation teacher, side by side in one process (`jobs/benchmark_train.py`).

    DistillationTiming        the shape, k -> m and the timing rounds
    time_distillation(cfg)    {"rows": {...}, "distillation_overhead": distil / reader, ...}

Three settings of one model and one batch, timed round-robin (each round runs every setting `steps` times, in an
order rotated each round; a setting's time is its median round):

    reader           pdist_weight 0: live stage A over k, the scorer, stage B and the decoder over the top m
    distil           pdist_weight 1: plus the teacher, reading on from the student's live stage A states
    distil_recompute pdist_weight 1, teacher_reuse off: the teacher runs the memory encoder and stage A again
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.model.random_t5 import random_t5, t5_1_1_config

SETTINGS = {
    "reader": dict(pdist_weight=0.0),
    "distil": dict(pdist_weight=1.0, teacher_reuse=True),
    "distil_recompute": dict(pdist_weight=1.0, teacher_reuse=False),
}


@dataclass
class DistillationTiming:
    d_model: int = 128  # the reader of jobs/configs/train_learning.yaml
    num_layers: int = 6
    num_heads: int = 4
    live_proportion: float = 2 / 3  # alpha
    rerank_proportion: float = 0.5  # beta
    vocab_size: int = 8000
    num_passages: int = 25  # k
    num_selected: int = 5  # m
    batch_size: int = 4  # examples per step
    question_tokens: int = 32
    passage_tokens: int = 96
    answer_tokens: int = 12
    steps: int = 3  # steps per setting per round
    rounds: int = 3  # round-robin rounds; a setting's time is its median round
    chunk_tokens: int | str | None = "auto"  # the live stages' chunk (modeling.resolve_chunk_tokens)
    seed: int = 0

    def validate(self) -> None:
        if not 1 <= self.num_selected <= self.num_passages:
            raise ValueError(
                f"need 1 <= num_selected <= num_passages, got m {self.num_selected}, k {self.num_passages}"
            )
        if self.steps < 1 or self.rounds < 1 or self.batch_size < 1:
            raise ValueError(
                f"steps, rounds and batch_size must be at least 1, got {self.steps}, {self.rounds}, {self.batch_size}"
            )


def random_batch(
    batch_size: int,
    num_passages: int,
    question_tokens: int,
    passage_tokens: int,
    answer_tokens: int,
    vocab_size: int,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A training batch of random tokens (full masks, random retrieval scores): the model's `forward` arguments."""
    generator = torch.Generator().manual_seed(seed)

    def ids(*shape: int) -> torch.Tensor:
        return torch.randint(2, vocab_size, shape, generator=generator)

    question_ids = ids(batch_size, question_tokens)  # [b, lq]
    passage_ids = ids(batch_size, num_passages, passage_tokens)  # [b, k, lp]
    return {
        "question_ids": question_ids,
        "question_mask": torch.ones_like(question_ids),
        "passage_ids": passage_ids,
        "passage_mask": torch.ones_like(passage_ids),
        "labels": ids(batch_size, answer_tokens),  # [b, la]
        "retrieval_scores": torch.rand(batch_size, num_passages, generator=generator),  # [b, k]
    }


def time_distillation(config: DistillationTiming) -> dict:
    """Seconds per training step of each setting and `distillation_overhead` = distil / reader."""
    config.validate()
    t5 = random_t5(
        t5_1_1_config(
            vocab_size=config.vocab_size,
            d_model=config.d_model,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            dropout_rate=0.0,
        ),
        seed=config.seed,
    )
    model = GlimmerForConditionalGeneration.from_t5(
        t5,
        live_proportion=config.live_proportion,
        rerank_proportion=config.rerank_proportion,
        num_selected=config.num_selected,
        retrieval_prior=True,
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)  # tiny steps: the timing, not the learning
    batch = random_batch(
        config.batch_size,
        config.num_passages,
        config.question_tokens,
        config.passage_tokens,
        config.answer_tokens,
        config.vocab_size,
        config.seed,
    )

    def step(arguments: dict) -> None:
        output = model(**batch, chunk_tokens=config.chunk_tokens, **arguments)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for arguments in SETTINGS.values():  # warm-up: allocator and kernels
        step(arguments)
    seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    names = list(SETTINGS)
    for round_index in range(config.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(config.steps):
                step(SETTINGS[name])
            seconds[name].append((time.perf_counter() - start) / config.steps)
    rows = {name: {"seconds_per_step": statistics.median(values), "rounds": values} for name, values in seconds.items()}
    reader = rows["reader"]["seconds_per_step"]
    for row in rows.values():
        row["time_over_reader"] = row["seconds_per_step"] / reader
    return {
        "rows": rows,
        "distillation_overhead": rows["distil"]["time_over_reader"],
        "recompute_overhead": rows["distil_recompute"]["time_over_reader"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }
