"""Batches of the tokenised stream (`data/stream.py`) as the reader's keyword arguments, shared by training,
evaluation and the probes.

    question_ids, question_mask  [b, lq]
    passage_ids, passage_mask    [b, k, lp]
    labels                       [b, t]
    retrieval_scores             [b, k]       the retriever's scores (the stream's passage_scores)
    evidence_ids, evidence_mask  [b, g, lp]   the gold evidence passages, when the stream has them
"""

from __future__ import annotations

import numpy as np
import torch

INPUT_KEYS = ("question_ids", "question_mask", "passage_ids", "passage_mask", "labels")
EVIDENCE_KEYS = ("evidence_ids", "evidence_mask")  # the gold evidence passages, read only by a gold reader warm-up


def model_inputs(
    batch: dict[str, np.ndarray], device: torch.device, closed_book: bool = False, eos_token_id: int = 1
) -> dict[str, torch.Tensor]:
    """Tensors for `GlimmerForConditionalGeneration.forward` from a tokenised batch.

    `closed_book` replaces the k passages by one passage holding only `</s>`: the reader then sees the
    question alone (the closed-book baseline trained the same way).
    """
    inputs = {
        key: torch.as_tensor(np.asarray(batch[key]), device=device)
        for key in INPUT_KEYS + EVIDENCE_KEYS
        if key in batch
    }
    if "passage_scores" in batch:
        inputs["retrieval_scores"] = torch.as_tensor(
            np.asarray(batch["passage_scores"], dtype=np.float32), device=device
        )
    if closed_book:
        batch_size = inputs["question_ids"].shape[0]
        inputs["passage_ids"] = torch.full((batch_size, 1, 1), eos_token_id, dtype=torch.long, device=device)
        inputs["passage_mask"] = torch.ones((batch_size, 1, 1), dtype=torch.long, device=device)
        # the one empty passage has no retriever score: zero, for a scorer with a retrieval prior
        inputs["retrieval_scores"] = torch.zeros((batch_size, 1), dtype=torch.float32, device=device)
    return inputs
