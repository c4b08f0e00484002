"""Pieces of a training step shared by the training and evaluation jobs.

deepspeed_config   the DeepSpeed dict for ZeRO stage 1/2/3, offload and precision
model_inputs       a numpy batch of the tokenised stream -> model keyword arguments
curriculum_step    a step's inputs and forward arguments: reader warm-up, distillation, reranker selection
reranker_recall    share of examples whose kept passages cover their gold pages (or gold passages)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from glimmer_ray.eval.metrics import covers_evidence, covers_passages


def deepspeed_config(
    micro_batch_size: int,
    gradient_accumulation_steps: int = 1,
    zero_stage: int = 2,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    bf16: bool = False,
    optimizer: str = "adamw",
    learning_rate: float = 1e-4,
    weight_decay: float = 0.0,
    gradient_clipping: float = 1.0,
    warmup_steps: int = 0,
) -> dict[str, Any]:
    """A DeepSpeed config. AdamW is DeepSpeed's own (`torch_adam`: no fused kernel to compile on CPU);
    Adafactor is passed as a client optimizer by the training job, so no `optimizer` section then."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if offload_parameters and zero_stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer and zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if warmup_steps > 0:  # DeepSpeed's own schedule: linear from 0 to learning_rate, then constant
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": learning_rate,
                "warmup_num_steps": warmup_steps,
                "warmup_type": "linear",
            },
        }
    if optimizer == "adamw":
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": learning_rate, "weight_decay": weight_decay, "torch_adam": True},
        }
    elif optimizer == "adafactor":
        config["zero_allow_untested_optimizer"] = True  # a client optimizer: ZeRO shards its states like any other
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'adafactor', got {optimizer!r}")
    if offload_optimizer and optimizer == "adamw":
        config["optimizer"]["params"]["torch_adam"] = False  # DeepSpeedCPUAdam serves offloaded states
    return config


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
    if closed_book:
        batch_size = inputs["question_ids"].shape[0]
        inputs["passage_ids"] = torch.full((batch_size, 1, 1), eos_token_id, dtype=torch.long, device=device)
        inputs["passage_mask"] = torch.ones((batch_size, 1, 1), dtype=torch.long, device=device)
    return inputs


def curriculum_step(
    inputs: dict[str, torch.Tensor], step: int, optim: Any, closed_book: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
    """The inputs and forward arguments of training step `step` (0-based) under the curriculum of `optim`
    (an `OptimSection`), and whether it is a reader warm-up step:

    - step < reader_warmup_steps: only the retriever's first `reader_warmup_passages` are read, all of them
      (no scores to select by or distil), or with `reader_warmup_source="gold"` the example's gold evidence
      passages: cheap steps in which a reader that cannot read yet learns to;
    - from distill_start_step: perplexity distillation (weight pdist_weight, temperature pdist_temperature);
    - step < rerank_warmup_steps: the decoder reads the retriever's first m, else the reranker's top m.

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
    distil = step >= optim.distill_start_step and not reader_warmup and not closed_book
    arguments = {
        "pdist_weight": optim.pdist_weight if distil else 0.0,
        "pdist_temperature": optim.pdist_temperature,
        "num_selected": 1 if closed_book else num_passages if reader_warmup else None,
        "select_by": "retriever" if reader_warmup or step < optim.rerank_warmup_steps else "reranker",
    }
    return inputs, arguments, reader_warmup


def reranker_recall(selected: torch.Tensor, candidates: np.ndarray, gold: np.ndarray, level: str = "page") -> float:
    """Mean over examples: 1 when the kept passages cover a complete gold evidence set.

    selected [b, m] indices into the k passages. At `level="page"` (KILT's granularity) candidates [b] are
    the k passages' page ids and gold [b] JSON lists of evidence sets (page ids); at `level="passage"`
    candidates are the k passage ids and gold the `gold_passages` JSON (per evidence set, per item, the
    passages holding it), so the passage of the gold page that holds the fact must be among the kept.
    """
    if level not in ("page", "passage"):
        raise ValueError(f"level must be 'page' or 'passage', got {level!r}")
    covers = covers_evidence if level == "page" else covers_passages
    hits = 0
    for row, ids, evidence in zip(selected.tolist(), candidates, gold):
        hits += covers(json.loads(evidence) if isinstance(evidence, str) else evidence, [ids[i] for i in row])
    return hits / max(1, len(selected))


def retriever_recall(num_selected: int, candidates: np.ndarray, gold: np.ndarray, level: str = "page") -> float:
    """The same measure for the retriever's own top-m (the first m of the k retrieved)."""
    first = torch.arange(num_selected).expand(len(candidates), num_selected)
    return reranker_recall(first, candidates, gold, level)
