"""FiD, LUMEN and GLIMMER answering the same random questions side by side: formula FLOPs, measured FLOPs and
wall-clock per example, on one set of random weights of a given shape.

Passage memory is pre-computed, as at serving time, and not timed. Variants run round-robin, call by call, so that
machine noise falls on all of them alike; ratios to the first variant (FiD) are the result to read. FLOPs are
counted once, in fp32 on the CPU; the timing runs on the configured device and dtype. Used by
jobs/benchmark_inference.py and jobs/check_gpu.py.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from glimmer_ray.config import to_dict
from glimmer_ray.eval.variants import VariantConfig, figure_2_variants
from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.model.flops import formula_flops, measure_reader_flops
from glimmer_ray.model.modeling import resolve_chunk_tokens
from glimmer_ray.model.random_t5 import random_t5, t5_1_1_config
from glimmer_ray.runtime import torch_device, torch_dtype


@dataclass
class ShapeConfig:
    vocab_size: int = 32128  # tokens (T5's vocabulary)
    d_model: int = 768  # width d
    num_layers: int = 12  # L, encoder and decoder each
    num_heads: int = 12  # attention heads (d_kv = d_model / num_heads)
    d_ff: int = 2048  # gated feed-forward width (2048 = 8 d / 3 at d 768: 8 d^2 weights)


@dataclass
class InferenceBenchmarkConfig:
    model: ShapeConfig = field(default_factory=ShapeConfig)
    variants: list[VariantConfig] = field(default_factory=figure_2_variants)  # the first is the baseline
    question_tokens: int = 48  # tokens per question
    passage_tokens: int = 304  # tokens per passage
    answer_tokens: int = 8  # greedy answer length, fixed (EOS suppressed)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])  # questions per call; a table for each
    num_examples: int = 3  # timed calls per variant
    warmup: int = 1  # untimed calls per variant first
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bfloat16 | float16: weights, memory and activations
    attention: list[str] = field(default_factory=lambda: ["sdpa"])  # sdpa | eager: each variant timed under each
    chunk_tokens: list[int | str | None] = field(
        default_factory=lambda: ["auto"]
    )  # live stages' chunk, each timed: auto (CPU 2048 tokens, GPU one call) | N | null (one call)
    seed: int = 0  # weights and inputs

    def validate(self) -> None:
        bad = [name for name in self.attention if name not in ATTENTION]
        if bad or not self.attention:
            raise ValueError(f"attention must be a non-empty list of {', '.join(ATTENTION)}, got {self.attention}")
        if not self.chunk_tokens:
            raise ValueError("chunk_tokens must list at least one setting (auto, null or a number of tokens)")
        for chunk in self.chunk_tokens:
            resolve_chunk_tokens(chunk, torch.device("cpu"))  # a bad value fails before any model is built


ATTENTION = ("sdpa", "eager")


@dataclass
class _Setting:
    """One timed row: a variant under one attention implementation and one live-stage chunk size."""

    variant: VariantConfig
    attention: str
    chunk_tokens: int | str | None

    @property
    def name(self) -> str:
        return f"{self.variant.name} {self.attention} c={self.chunk_tokens}"


def _inputs(
    model: GlimmerForConditionalGeneration,
    config: InferenceBenchmarkConfig,
    batch: int,
    num_passages: int,
    generator: torch.Generator,
):
    vocab, device = config.model.vocab_size, next(model.parameters()).device
    question_ids = torch.randint(2, vocab, (batch, config.question_tokens), generator=generator).to(device)
    passage_ids = torch.randint(2, vocab, (batch * num_passages, config.passage_tokens), generator=generator)
    passage_ids = passage_ids.to(device)
    passage_mask = torch.ones_like(passage_ids)
    with torch.no_grad():  # pre-computed memory, as the memory store serves it: not timed
        memory = model.encode_memory(passage_ids, passage_mask)  # [b*k, lp, d]
    return (
        question_ids,
        torch.ones_like(question_ids),
        memory.view(batch, num_passages, config.passage_tokens, -1),  # [b, k, lp, d]
        passage_mask.view(batch, num_passages, config.passage_tokens),  # [b, k, lp]
    )


def _clock(device: torch.device) -> float:
    """Wall time once the device has finished what was queued (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def _timed_answer(model, inputs, answer_tokens: int, chunk_tokens: int | str | None = "auto") -> tuple[float, float]:
    question_ids, question_mask, memory, passage_mask = inputs
    device = question_ids.device
    start = _clock(device)
    encoding = model.encode(
        question_ids, question_mask, passage_memory=memory, passage_mask=passage_mask, chunk_tokens=chunk_tokens
    )
    encoded = _clock(device)
    model.generate_from_encoding(
        encoding.hidden, encoding.mask, max_new_tokens=answer_tokens, min_new_tokens=answer_tokens
    )
    return encoded - start, _clock(device) - encoded


def _settings(config: InferenceBenchmarkConfig) -> list[_Setting]:
    return [
        _Setting(variant, attention, chunk)
        for variant in config.variants
        for attention in config.attention
        for chunk in config.chunk_tokens
    ]


def _time_batch_size(
    config: InferenceBenchmarkConfig, models: dict, flops: dict, batch_size: int, generator: torch.Generator
) -> dict:
    """Time every setting (variant x attention x chunk) at one batch size, round-robin; print and return the table."""
    settings = _settings(config)
    inputs = {v.name: _inputs(models[v.name], config, batch_size, v.num_passages, generator) for v in config.variants}
    timings = {s.name: {"encode": [], "decode": []} for s in settings}
    total_rounds = config.warmup + config.num_examples
    for round_index in range(total_rounds):
        for setting in settings:
            model = models[setting.variant.name]
            if model.config._attn_implementation != setting.attention:
                model.set_attn_implementation(setting.attention)
            encode_s, decode_s = _timed_answer(
                model, inputs[setting.variant.name], config.answer_tokens, setting.chunk_tokens
            )
            if round_index >= config.warmup:
                timings[setting.name]["encode"].append(encode_s / batch_size)
                timings[setting.name]["decode"].append(decode_s / batch_size)
        print(
            f"batch {batch_size}: round {round_index + 1}/{total_rounds}{' (warm-up)' if round_index < config.warmup else ''}",
            flush=True,
        )

    baseline = config.variants[0].name
    results = []
    for setting in settings:
        timing = timings[setting.name]
        per_example = [e + d for e, d in zip(timing["encode"], timing["decode"])]
        formula, measured = flops[setting.variant.name]
        results.append(
            {
                "name": setting.name,
                "variant": to_dict(setting.variant),
                "attention": setting.attention,
                "chunk_tokens": setting.chunk_tokens,
                "formula_flops": formula,
                "measured_flops": measured,
                "seconds_per_example": statistics.median(per_example),
                "encode_seconds_per_example": statistics.median(timing["encode"]),
                "decode_seconds_per_example": statistics.median(timing["decode"]),
                "all_seconds_per_example": per_example,
            }
        )
    base = results[0]
    for result in results:
        result["flops_ratio_to_baseline"] = result["formula_flops"]["total"] / base["formula_flops"]["total"]
        result["measured_flops_ratio_to_baseline"] = result["measured_flops"]["total"] / base["measured_flops"]["total"]
        result["time_ratio_to_baseline"] = result["seconds_per_example"] / base["seconds_per_example"]
        # achieved FLOP/s: the measured count (a multiply-add counted once) as 2 FLOPs each, over the time
        result["achieved_tflops"] = 2 * result["measured_flops"]["total"] / result["seconds_per_example"] / 1e12
        result["encode_time_ratio_to_baseline"] = (
            result["encode_seconds_per_example"] / base["encode_seconds_per_example"]
        )
    header = (
        f"{'variant':<18} {'attn':<5} {'chunk':>5} {'paper GF':>9} {'+Q mem GF':>9} {'meas. GF':>9} {'meas.proj':>9} {'s/ex':>7} {'enc s':>7} "
        f"{'dec s':>7} {'FLOPs/' + baseline[:3]:>9} {'time/' + baseline[:3]:>8} {'enc/' + baseline[:3]:>7} {'TFLOP/s':>8}"
    )
    print(
        f"\nbatch size {batch_size}, {config.answer_tokens} answer tokens, median of {config.num_examples} calls, "
        f"{config.device} {config.dtype}\n{header}\n{'-' * len(header)}"
    )
    for r in results:
        print(
            f"{r['variant']['name']:<18} {r['attention']:<5} {str(r['chunk_tokens']):>5} {r['formula_flops']['paper_total'] / 1e9:9.1f} {r['formula_flops']['total'] / 1e9:9.1f} "
            f"{r['measured_flops']['total'] / 1e9:9.1f} {r['measured_flops']['projections'] / 1e9:9.1f} "
            f"{r['seconds_per_example']:7.3f} {r['encode_seconds_per_example']:7.3f} {r['decode_seconds_per_example']:7.3f} "
            f"{r['flops_ratio_to_baseline']:9.3f} {r['time_ratio_to_baseline']:8.3f} {r['encode_time_ratio_to_baseline']:7.3f} "
            f"{r['achieved_tflops']:8.3f}"
        )
    print(
        "GF: 1e9 FLOPs per example, a multiply-add counted once (the paper's convention); 'meas. GF' adds attention "
        "scores and the vocabulary projection, which the formulas leave out.\n",
        flush=True,
    )
    return {"batch_size": batch_size, "results": results}


def run_inference_benchmark(config: InferenceBenchmarkConfig) -> dict:
    """Build the variants from one random T5.1.1, count their FLOPs, time them at every batch size (a printed
    table each); returns the device, the torch version and the tables."""
    config.validate()
    device, dtype = torch_device(config.device), torch_dtype(config.dtype)  # a GPU where there is none fails here
    shape = config.model
    t5_config = t5_1_1_config(**to_dict(shape), dropout_rate=0.0)
    print(
        f"building one random T5.1.1 (d {shape.d_model}, {shape.num_layers} layers); torch threads {torch.get_num_threads()}",
        flush=True,
    )
    t5 = random_t5(t5_config, seed=config.seed)
    models = {
        variant.name: GlimmerForConditionalGeneration.from_t5(
            t5,
            live_proportion=variant.live_proportion,
            rerank_proportion=variant.rerank_proportion,
            num_selected=variant.num_selected,
        ).eval()
        for variant in config.variants
    }
    del t5
    generator = torch.Generator().manual_seed(config.seed)
    pair_tokens = config.question_tokens + config.passage_tokens
    flops = {}
    for variant in config.variants:
        model = models[variant.name]
        formula = formula_flops(
            model.config, variant.num_passages, pair_tokens, config.answer_tokens, config.question_tokens
        )
        measured = measure_reader_flops(
            model, *_inputs(model, config, 1, variant.num_passages, generator), target_tokens=config.answer_tokens
        )
        flops[variant.name] = (formula.as_dict(), measured.as_dict())
        print(
            f"  {variant.name}: memory layers {model.config.num_memory_layers}, live A {model.config.num_live_a_layers}, "
            f"live B {model.config.num_live_b_layers}; formula {formula.total / 1e9:.1f} GFLOPs",
            flush=True,
        )
    for model in models.values():
        model.to(device, dtype)  # FLOPs above were counted on CPU in fp32; the timing runs as configured
    tables = [_time_batch_size(config, models, flops, batch_size, generator) for batch_size in config.batch_sizes]
    return {
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tables": tables,
    }
