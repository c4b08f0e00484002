"""The GLIMMER reader: configuration, model, FLOP accounting and tiny random checkpoints."""

from transformers import AutoConfig, AutoModel

from glimmer_ray.model.configuration import GlimmerConfig
from glimmer_ray.model.modeling import (
    GlimmerEncoding,
    GlimmerForConditionalGeneration,
    GlimmerOutput,
    perplexity_distillation_loss,
)

AutoConfig.register("glimmer", GlimmerConfig, exist_ok=True)
AutoModel.register(GlimmerConfig, GlimmerForConditionalGeneration, exist_ok=True)

__all__ = [
    "GlimmerConfig",
    "GlimmerEncoding",
    "GlimmerForConditionalGeneration",
    "GlimmerOutput",
    "perplexity_distillation_loss",
]
