"""FiD, LUMEN and GLIMMER as settings of one reader: the variants the paper's Figures 2, 3 and 5 compare.

A variant only moves the memory/live split (alpha), the reranking point (beta) and m; the T5 weights are
the same, so one trained checkpoint gives every setting (`reader_variant`).
"""

from __future__ import annotations

from dataclasses import dataclass

from glimmer_ray.model import GlimmerForConditionalGeneration


@dataclass
class VariantConfig:
    name: str = "fid"  # label in the table
    num_passages: int = 5  # k retrieved
    num_selected: int | None = None  # m kept by the reranker; null = no reranking
    live_proportion: float = 1.0  # alpha
    rerank_proportion: float = 0.25  # beta


def figure_2_variants() -> list[VariantConfig]:
    """The paper's Figure 2: FiD with 5 passages, LUMEN with 10 (alpha 1/3), GLIMMER 25 -> 5 (alpha 1/3, beta 1/4)."""
    return [
        VariantConfig("FiD k=5", 5, None, 1.0, 0.25),
        VariantConfig("LUMEN k=10", 10, None, 1 / 3, 0.25),
        VariantConfig("GLIMMER k=25 m=5", 25, 5, 1 / 3, 0.25),
    ]


def reader_variant(model: GlimmerForConditionalGeneration, variant: VariantConfig) -> GlimmerForConditionalGeneration:
    """The same weights under another split: a new model whose config differs only in alpha, beta and m."""
    config = model.config.to_dict()
    config.update(
        live_proportion=variant.live_proportion,
        rerank_proportion=variant.rerank_proportion,
        num_selected=variant.num_selected,
    )
    other = GlimmerForConditionalGeneration(type(model.config).from_dict(config))
    missing, unexpected = other.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [name for name in missing if "lm_head" not in name]:
        raise ValueError(
            f"variant {variant.name} does not take the checkpoint's weights: missing {missing}, unexpected {unexpected}"
        )
    return other.eval()
