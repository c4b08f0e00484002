"""Tiny random T5.1.1 checkpoints, saved in Hugging Face layout.

No weights can be downloaded on our development and CI machines, so tests, demos and the
quickstart build their reader from a randomly initialised T5.1.1 saved with `save_pretrained`
and loaded back through the same `from_pretrained(local_dir)` path a real checkpoint takes.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

T5_1_1_DEFAULTS = dict(
    feed_forward_proj="gated-gelu",  # T5.1.1: gated GELU feed-forward
    tie_word_embeddings=False,  # T5.1.1: separate output embedding, no rescaling
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)


# The original T5's output layer: the input embedding, tied, on the decoder state rescaled by d^-0.5. A from-scratch
# reader then writes a token by pointing at its embedding, so copying a name from a passage needs no output row
# learned for each of its sub-words (T5.1.1's untied layer does).
TIED_EMBEDDINGS = dict(tie_word_embeddings=True, scale_decoder_outputs=True)


def t5_1_1_config(
    vocab_size: int = 512,
    d_model: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    d_kv: int | None = None,
    d_ff: int | None = None,
    **overrides,
) -> T5Config:
    """A T5.1.1 configuration; `d_kv` defaults to d_model / num_heads, `d_ff` to 8 d / 3 rounded
    (so the gated feed-forward holds 8 d^2 weights, as the paper's FLOP formulas assume)."""
    if d_model % num_heads and d_kv is None:
        raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}; give d_kv")
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        d_kv=d_kv or d_model // num_heads,
        d_ff=d_ff or round(8 * d_model / 3),
        **{**T5_1_1_DEFAULTS, **overrides},
    )


def random_t5(config: T5Config, seed: int = 0) -> T5ForConditionalGeneration:
    """A randomly initialised T5 with T5.1.1's untied output embedding, initialised to start sane.

    Hugging Face draws an untied T5.1.1 output layer at std 1.0. Its input is the decoder's RMS-normalised
    state (unit scale per component), so the first logits have std sqrt(d_model) and the first LM loss is
    about sqrt(d) times ln(V)'s scale (29 at d 64, 88 at d 512, against ln(V) = 8.3 for V = 4000): a
    from-scratch run spends its first hundreds of steps undoing that. Drawn at std d^-0.5 the first logits
    have unit std and the first loss is about ln(V) + 1/2, the loss of a uniform guess. A real T5
    checkpoint never sees this initialisation."""
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    if not config.scale_decoder_outputs and model.lm_head.weight is model.shared.weight:
        # Transformers 5 ties the output embedding at construction; T5.1.1 checkpoints keep their own.
        std = config.initializer_factor * config.d_model**-0.5
        model.lm_head.weight = nn.Parameter(torch.randn_like(model.shared.weight) * std)
        model.all_tied_weights_keys.pop("lm_head.weight", None)
    elif config.scale_decoder_outputs:
        # Tied (TIED_EMBEDDINGS): the decoder's state holds its input token's embedding, so at std 1 that token's
        # logit is sqrt(d) (a first loss of 14 at d 512); at std d^-0.5 every first logit is O(1).
        with torch.no_grad():
            model.shared.weight.normal_(0.0, config.initializer_factor * config.d_model**-0.5)
    return model.eval()


def save_random_t5(path: str | os.PathLike, config: T5Config | None = None, seed: int = 0) -> str:
    """Save a random T5.1.1 (default: `t5_1_1_config()`) to `path` with safetensors; returns the path."""
    model = random_t5(config or t5_1_1_config(), seed=seed)
    model.save_pretrained(path)
    return os.fspath(path)
