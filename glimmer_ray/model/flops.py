"""FLOPs of FiD, LUMEN and GLIMMER: the paper's formulas and a measurement of a real forward pass.

Formulas (GLIMMER, arXiv 2306.10231, sections 2-3), per example, ignoring attention scores:

    F_FiD     = k n_p L 14 d^2 + n_t L 14 d^2
    F_LUMEN   = k n_p alpha L 12 d^2 + k n_p L 2 d^2 + n_t L 14 d^2
    F_GLIMMER = F_LUMEN(k -> m) + (k - m) n_p beta alpha L 12 d^2

with n_p tokens per question-passage pair and n_t target tokens. The paper counts one
multiply-add as one FLOP (8 d^2 per token for the feed-forward, 4 d^2 for the self-attention
projections, 2 d^2 for the cross-attention keys and values). `torch.utils.flop_counter` counts a
multiply-add as two, so measurements are halved before they are compared.

Here alpha L and beta alpha L are the model's integer layer counts, and the question's own
memory pass, n_q (1 - alpha) L 12 d^2, which the paper leaves out, is counted separately.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from glimmer_ray.model.configuration import GlimmerConfig

VARIANTS = ("fid", "lumen", "glimmer")


@dataclass(frozen=True)
class FlopBreakdown:
    """Per-example FLOPs (paper convention: multiply-add = 1), split as the formulas are."""

    question_memory: float  # MemEnc(Q): n_q * n_mem * 12 d^2
    live_a: float  # all k pairs through live stage A
    live_b: float  # the m selected pairs through live stage B
    cross_attention: float  # keys/values of the m selected pairs in every decoder layer
    decoder: float  # n_t target tokens through the decoder

    @property
    def paper_total(self) -> float:
        """The paper's formula: everything but the question's memory pass."""
        return self.live_a + self.live_b + self.cross_attention + self.decoder

    @property
    def total(self) -> float:
        return self.paper_total + self.question_memory

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "paper_total": self.paper_total, "total": self.total}


def formula_flops(
    config: GlimmerConfig,
    num_passages: int,
    pair_tokens: int,
    target_tokens: int,
    question_tokens: int,
    num_selected: int | None = None,
) -> FlopBreakdown:
    """The paper's FLOP formulas for `config` reading k = `num_passages` pairs of n_p = `pair_tokens`.

    `num_selected` overrides the config's m; None (and the config's None) means no reranking,
    i.e. LUMEN, or FiD when alpha = 1.
    """
    k = num_passages
    m = config.num_selected if num_selected is None else num_selected
    m = k if m is None else m
    if not 1 <= m <= k:
        raise ValueError(f"need 1 <= m <= k, got m = {m}, k = {k}")
    d2 = config.d_model**2
    decoder_layers = config.num_decoder_layers
    return FlopBreakdown(
        question_memory=question_tokens * config.num_memory_layers * 12 * d2,
        live_a=k * pair_tokens * config.num_live_a_layers * 12 * d2,
        live_b=m * pair_tokens * config.num_live_b_layers * 12 * d2,
        cross_attention=m * pair_tokens * decoder_layers * 2 * d2,
        decoder=target_tokens * decoder_layers * 14 * d2,
    )


def paper_formula(
    variant: str,
    *,
    num_passages: int,
    pair_tokens: int,
    target_tokens: int,
    num_layers: int,
    d_model: int,
    live_proportion: float = 1.0,
    rerank_proportion: float = 0.0,
    num_selected: int | None = None,
) -> float:
    """The three formulas exactly as printed, with real-valued alpha and beta."""
    k, n_p, n_t, L, d2 = num_passages, pair_tokens, target_tokens, num_layers, d_model**2
    alpha, beta = live_proportion, rerank_proportion
    if variant == "fid":
        return k * n_p * L * 14 * d2 + n_t * L * 14 * d2
    if variant == "lumen":
        return k * n_p * alpha * L * 12 * d2 + k * n_p * L * 2 * d2 + n_t * L * 14 * d2
    if variant == "glimmer":
        m = num_selected if num_selected is not None else k
        lumen_m = paper_formula(
            "lumen",
            num_passages=m,
            pair_tokens=n_p,
            target_tokens=n_t,
            num_layers=L,
            d_model=d_model,
            live_proportion=alpha,
        )
        return lumen_m + (k - m) * n_p * beta * alpha * L * 12 * d2
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


@dataclass(frozen=True)
class MeasuredFlops:
    """FLOPs counted by `FlopCounterMode` during one call, halved to the paper's convention."""

    projections: float  # every linear layer of encoder and decoder (what the formulas count)
    attention: float  # attention scores and weighted sums (the formulas ignore them)
    lm_head: float  # output projection to the vocabulary (not in the formulas)
    rerank_head: float  # the scoring layer (k d per example, negligible)

    @property
    def total(self) -> float:
        return self.projections + self.attention + self.lm_head + self.rerank_head

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def measure_flops(model: nn.Module, fn, *args, **kwargs) -> tuple[MeasuredFlops, object]:
    """Run `fn(*args, **kwargs)` under `FlopCounterMode` and attribute the counts to `model`'s layers.

    Returns the breakdown and whatever `fn` returned.
    """
    linear_names = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    counter = FlopCounterMode(display=False)
    with counter:
        result = fn(*args, **kwargs)
    per_module = counter.get_flop_counts()
    total = sum(per_module["Global"].values())
    linear = {"projections": 0, "lm_head": 0, "rerank_head": 0}
    root = type(model).__name__ + "."
    for path, ops in per_module.items():
        name = path[len(root) :] if path.startswith(root) else None
        if name not in linear_names:
            continue
        bucket = "lm_head" if name == "lm_head" else "rerank_head" if name.startswith("rerank_head") else "projections"
        linear[bucket] += sum(ops.values())
    attention = total - sum(linear.values())
    return (
        MeasuredFlops(
            projections=linear["projections"] / 2,
            attention=attention / 2,
            lm_head=linear["lm_head"] / 2,
            rerank_head=linear["rerank_head"] / 2,
        ),
        result,
    )


@torch.no_grad()
def measure_reader_flops(
    model: nn.Module,
    question_ids: torch.Tensor,
    question_mask: torch.Tensor,
    passage_memory: torch.Tensor,
    passage_mask: torch.Tensor,
    target_tokens: int,
    num_selected: int | None = None,
) -> MeasuredFlops:
    """Measure one inference pass per example as the formulas define it: question memory, live
    encoder over pre-computed passage memory, and the decoder over `target_tokens` tokens (teacher
    forced, which costs what greedy decoding with a key/value cache costs). Divided by batch size.
    Runs with eager attention so that attention-score FLOPs are counted too."""
    batch_size = question_ids.shape[0]
    decoder_input_ids = torch.zeros(batch_size, target_tokens, dtype=torch.long, device=question_ids.device)
    # Fused attention kernels are invisible to the counter; eager attention shows the score matmuls.
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        measured, _ = measure_flops(
            model,
            model,
            question_ids,
            question_mask,
            passage_memory=passage_memory,
            passage_mask=passage_mask,
            decoder_input_ids=decoder_input_ids,
            num_selected=num_selected,
        )
    finally:
        model.set_attn_implementation(implementation)
    return MeasuredFlops(**{key: value / batch_size for key, value in asdict(measured).items()})
