"""The training curriculum: which passages a step reads, whether it distils, and what selects the m passages the
decoder reads (the paper trains the reranker only through perplexity distillation, so a reader that cannot read
yet first learns to, on cheap steps)."""

from __future__ import annotations

from typing import Any

import torch

from glimmer_ray.data.batches import EVIDENCE_KEYS


def curriculum_step(
    inputs: dict[str, torch.Tensor], step: int, optim: Any, closed_book: bool = False, gate_open: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
    """The inputs and forward arguments of training step `step` (0-based) under the curriculum of `optim`
    (an `OptimSection`), and whether it is a reader warm-up step:

    - step < reader_warmup_steps: only the retriever's first `reader_warmup_passages` are read, all of them
      (no scores to select by or distil), or with `reader_warmup_source="gold"` the example's gold evidence
      passages: cheap steps in which a reader that cannot read yet learns to;
    - from distill_start_step: perplexity distillation (weight pdist_weight, temperature pdist_temperature);
    - step < rerank_warmup_steps: the decoder reads the retriever's first m, else the reranker's top m;
    - while `gate_open` is false (optim.distill_gate: the teacher has not yet matched the retriever on held-out
      examples), no distillation and the retriever's first m.

    The closed-book baseline reads its one empty passage throughout and never distils.
    """
    reader_warmup = step < optim.reader_warmup_steps and not closed_book
    evidence = {key: inputs[key] for key in EVIDENCE_KEYS if key in inputs}
    inputs = {key: value for key, value in inputs.items() if key not in EVIDENCE_KEYS}  # never a forward argument
    num_passages = None
    if reader_warmup and optim.reader_warmup_source == "gold":
        if not evidence:
            raise ValueError(
                "reader_warmup_source 'gold' needs the stream's evidence_ids / evidence_mask (the gold evidence passages)"
            )
        inputs = {**inputs, "passage_ids": evidence["evidence_ids"], "passage_mask": evidence["evidence_mask"]}
        num_passages = inputs["passage_ids"].shape[1]
        if "retrieval_scores" in inputs:  # nothing is ranked in the warm-up; a prior scorer still needs scores
            inputs["retrieval_scores"] = inputs["retrieval_scores"].new_zeros(inputs["passage_ids"].shape[:2])
    elif reader_warmup:
        num_passages = optim.reader_warmup_passages
        if not 1 <= num_passages <= inputs["passage_ids"].shape[1]:
            raise ValueError(
                f"reader_warmup_passages must be between 1 and k = {inputs['passage_ids'].shape[1]}, got {num_passages}"
            )
        inputs = {
            **inputs,
            "passage_ids": inputs["passage_ids"][:, :num_passages],
            "passage_mask": inputs["passage_mask"][:, :num_passages],
        }
        if "retrieval_scores" in inputs:
            inputs["retrieval_scores"] = inputs["retrieval_scores"][:, :num_passages]
    distil = step >= optim.distill_start_step and not reader_warmup and not closed_book and gate_open
    arguments = {
        "pdist_weight": optim.pdist_weight if distil else 0.0,
        "pdist_temperature": optim.pdist_temperature,
        "num_selected": 1 if closed_book else num_passages if reader_warmup else None,
        "select_by": "retriever" if reader_warmup or step < optim.rerank_warmup_steps or not gate_open else "reranker",
    }
    return inputs, arguments, reader_warmup
