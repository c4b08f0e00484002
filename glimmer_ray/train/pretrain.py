"""Denoising pre-training of a T5.1.1 on the knowledge source's passages (text infilling).

GLIMMER is fine-tuned from a pre-trained T5.1.1 (the paper: T5.1.1 base/large/xl). Offline machines
cannot download one, and a randomly initialised reader trained on the KILT tasks alone learns to answer
from memory of the training questions but never to read its passages (on SynthKILT: dev EM at the
closed-book level after 1,750 steps with the gold passage always given). Pre-training first on the
passages themselves with a dense copy signal fixes that: the encoder reads a passage whose spans are
each replaced by one sentinel, and the decoder writes the whole original passage (BART's text
infilling, in T5's vocabulary), so every target token teaches the decoder to find and copy its input.

    corrupt(ids, rng, ...)            one passage -> (input ids with sentinels, target = the passage)
    DenoisingBatches(passages, ...)   random batches of corrupted passages as padded tensors
"""

from __future__ import annotations

import numpy as np
import torch


def corrupt(
    ids: list[int],
    rng: np.random.Generator,
    first_sentinel: int,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    eos_token_id: int = 1,
) -> tuple[list[int], list[int]]:
    """Replace random spans (about `noise_density` of the tokens, spans of 1 to 2 * mean - 1 tokens)
    by one sentinel each (`first_sentinel`, then the ids below it, as T5's `<extra_id_N>`).

    Returns (input ids + </s>, target ids = the uncorrupted passage + </s>)."""
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must lie in (0, 1), got {noise_density}")
    if mean_span_length < 1.0:
        raise ValueError(f"mean_span_length must be at least 1, got {mean_span_length}")
    length = len(ids)
    if length < 2:
        return list(ids) + [eos_token_id], list(ids) + [eos_token_id]
    num_noise = max(1, round(length * noise_density))
    num_spans = max(1, min(length - 1, round(num_noise / mean_span_length)))
    starts = np.sort(rng.choice(length, size=num_spans, replace=False))
    corrupted, position, sentinel = [], 0, first_sentinel
    for start in starts.tolist():
        if start < position:  # overlaps the previous span
            continue
        span = int(rng.integers(1, max(2, round(2 * mean_span_length))))
        corrupted += ids[position:start] + [sentinel]
        sentinel -= 1
        position = min(length, start + span)
    corrupted += ids[position:]
    return corrupted + [eos_token_id], list(ids) + [eos_token_id]


class DenoisingBatches:
    """Random batches of corrupted passages: input_ids/attention_mask [b, l_in], labels [b, l_out]
    (-100 after the passage's </s>)."""

    def __init__(self, passages: list[list[int]], batch_size: int, first_sentinel: int, seed: int = 0,
                 noise_density: float = 0.15, mean_span_length: float = 3.0, eos_token_id: int = 1, pad_token_id: int = 0) -> None:
        if not passages:
            raise ValueError("no passages to pre-train on")
        self.passages = passages
        self.batch_size = batch_size
        self.first_sentinel = first_sentinel
        self.rng = np.random.default_rng(seed)
        self.noise_density = noise_density
        self.mean_span_length = mean_span_length
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def next(self) -> dict[str, torch.Tensor]:
        chosen = self.rng.integers(0, len(self.passages), size=self.batch_size)
        pairs = [corrupt(self.passages[i], self.rng, self.first_sentinel, self.noise_density, self.mean_span_length, self.eos_token_id)
                 for i in chosen.tolist()]
        input_length = max(len(source) for source, _ in pairs)
        target_length = max(len(target) for _, target in pairs)
        input_ids = torch.full((self.batch_size, input_length), self.pad_token_id, dtype=torch.long)  # [b, l_in]
        labels = torch.full((self.batch_size, target_length), -100, dtype=torch.long)  # [b, l_out]
        for row, (source, target) in enumerate(pairs):
            input_ids[row, : len(source)] = torch.tensor(source)
            labels[row, : len(target)] = torch.tensor(target)
        attention_mask = torch.zeros_like(input_ids)
        for row, (source, _) in enumerate(pairs):
            attention_mask[row, : len(source)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
