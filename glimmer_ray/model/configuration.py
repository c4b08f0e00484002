"""Architecture configuration of a GLIMMER reader (de Jong et al. 2023, arXiv 2306.10231).

A `GlimmerConfig` is a T5.1.1 configuration plus the four numbers that split its encoder:

    n_mem   = round((1 - alpha) * L)       memory layers, run offline over the corpus
    n_liveA = round(beta * alpha * L)      live stage A, followed by the rerank scorer
    n_liveB = L - n_mem - n_liveA          live stage B, run on the m selected passages only

where L = `num_layers`, alpha = `live_proportion` and beta = `rerank_proportion`. Rounding is
half-up (0.5 -> 1), not Python's banker's rounding.

The config describes the architecture only: batch size, the number of retrieved passages k,
loss weights and optimiser settings are arguments of `forward` or of the training job.
FiD and LUMEN are settings of the same model: FiD is alpha = 1 with `num_selected=None`,
LUMEN is alpha < 1 with `num_selected=None`.
"""

from __future__ import annotations

import math

from transformers import T5Config

SCORING_METHODS = ("first_token", "mean_pool")


def _round_half_up(value: float) -> int:
    # The epsilon absorbs float error such as (1 - 1/3) * 12 = 7.999999999999998.
    return int(math.floor(value + 0.5 + 1e-9))


class GlimmerConfig(T5Config):
    """T5.1.1 fields plus GLIMMER's split of the encoder.

    Args:
        live_proportion: alpha in [0, 1], the share of encoder layers run live (1 = FiD).
        rerank_proportion: beta in [0, 1], the share of the live layers run before reranking.
        num_selected: m, the passages kept after reranking; `None` disables reranking
            (LUMEN, or FiD with alpha = 1). Can be overridden per call of `forward`/`generate`.
        scoring: how a passage's score is read off live stage A: `"first_token"` (the paper's
            default: a linear layer on the first token of [question; passage]) or `"mean_pool"`.
        separate_question_encoder: encode the question with its own copy of the memory layers
            (the original LUMEN) instead of the shared memory encoder (GLIMMER's default).
        retrieval_prior: add the retriever's score as a prior, s_i = w . H'_i + gamma * r_i, with
            gamma learned and w starting at zero, so an untrained scorer ranks as the retriever and
            distillation learns corrections to it (an option beside the paper's pure scorer).
        **kwargs: any `T5Config` field (d_model, num_layers, num_heads, d_ff, ...).
    """

    model_type = "glimmer"

    def __init__(
        self,
        live_proportion: float = 1.0,
        rerank_proportion: float = 0.25,
        num_selected: int | None = None,
        scoring: str = "first_token",
        separate_question_encoder: bool = False,
        retrieval_prior: bool = False,
        **kwargs,
    ) -> None:
        if not 0.0 <= float(live_proportion) <= 1.0:
            raise ValueError(f"live_proportion (alpha) must lie in [0, 1], got {live_proportion}")
        if not 0.0 <= float(rerank_proportion) <= 1.0:
            raise ValueError(f"rerank_proportion (beta) must lie in [0, 1], got {rerank_proportion}")
        if num_selected is not None and (
            isinstance(num_selected, bool) or int(num_selected) != num_selected or num_selected < 1
        ):
            raise ValueError(f"num_selected (m) must be a positive integer or None, got {num_selected!r}")
        if scoring not in SCORING_METHODS:
            raise ValueError(f"scoring must be one of {SCORING_METHODS}, got {scoring!r}")
        self.live_proportion = float(live_proportion)
        self.rerank_proportion = float(rerank_proportion)
        self.num_selected = None if num_selected is None else int(num_selected)
        self.scoring = scoring
        self.separate_question_encoder = bool(separate_question_encoder)
        self.retrieval_prior = bool(retrieval_prior)
        super().__init__(**kwargs)
        if (
            self.num_selected is not None
            and scoring == "first_token"
            and self.num_memory_layers > 0
            and self.num_live_a_layers == 0
        ):
            raise ValueError(
                f"with {self.num_layers} layers, alpha {self.live_proportion:.3g} and beta {self.rerank_proportion:.3g} no live layer runs before "
                "reranking, so first_token scoring would read the question's first token from memory and score every passage alike; "
                "raise rerank_proportion or live_proportion, use more layers, or scoring='mean_pool'"
            )

    @property
    def num_memory_layers(self) -> int:
        """n_mem: encoder blocks [0, n_mem) form the memory encoder."""
        return _round_half_up((1.0 - self.live_proportion) * self.num_layers)

    @property
    def num_live_a_layers(self) -> int:
        """n_liveA: the live blocks run on all k passages before the scorer."""
        return min(
            _round_half_up(self.rerank_proportion * self.live_proportion * self.num_layers),
            self.num_layers - self.num_memory_layers,
        )

    @property
    def num_live_b_layers(self) -> int:
        """n_liveB: the live blocks run on the m selected passages only."""
        return self.num_layers - self.num_memory_layers - self.num_live_a_layers

    @property
    def lm_head_tied(self) -> bool:
        """Original T5 ties and rescales the output embedding; T5.1.1 does neither."""
        return bool(getattr(self, "scale_decoder_outputs", True))
