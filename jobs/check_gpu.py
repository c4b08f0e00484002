"""Does the reader run on a GPU as on the CPU, in fp32 and bf16, and how fast: a check a user runs on a new GPU box.

    python jobs/check_gpu.py --config jobs/configs/check_gpu.yaml
    python jobs/check_gpu.py --config jobs/configs/check_gpu.yaml device=cpu tiny=true output_dir=DIR   # any machine

It needs torch and transformers only (no Ray, DeepSpeed or FAISS), so it runs on a bare CUDA machine. One random
GLIMMER reader (its T5.1.1 from `glimmer_ray.model.random_t5`) on random tokens:
1. the same weights in fp32 on the CPU and on `device`: loss, distillation loss, a scoring-head gradient, greedy
   tokens; and the first LM loss against ln(V), a uniform guess;
2. bf16 autocast against fp32 on `device`, and a reader held in `dtype` weights: its selection and greedy tokens;
3. in `dtype`: memory encoding, live encoding with reranking, and greedy generation, ms per example;
4. the median time of a training step (`dtype` autocast, AdamW) of FiD k = m, GLIMMER k -> m without and with
   perplexity distillation (LM + distillation, backward): the distillation overhead, the ratio of the last two;
5. FiD / LUMEN / GLIMMER inference at T5-large shape (`inference`, glimmer_ray.eval.inference) in `dtype`:
   ms per example, time and FLOPs against FiD, achieved TFLOP/s.
`tiny: true` shrinks every shape (seconds on a CPU). Prints each part and writes output_dir/check_gpu.json.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from glimmer_ray.cli import write_report
from glimmer_ray.config import parse_job_args, to_dict
from glimmer_ray.eval.inference import InferenceBenchmarkConfig, ShapeConfig, run_inference_benchmark
from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.model.random_t5 import random_t5, t5_1_1_config
from glimmer_ray.runtime import torch_device, torch_dtype


def t5_large_inference() -> InferenceBenchmarkConfig:
    """T5.1.1-large (d 1024, 24 + 24 layers, 16 heads, d_ff 2816), 32 question + 256 passage tokens, 8-token answers."""
    return InferenceBenchmarkConfig(
        model=ShapeConfig(vocab_size=32128, d_model=1024, num_layers=24, num_heads=16, d_ff=2816),
        question_tokens=32,
        passage_tokens=256,
        answer_tokens=8,
        batch_sizes=[1, 16],
        num_examples=5,
        warmup=2,
    )


@dataclass
class CheckGpuConfig:
    device: str | None = None  # torch device; null = cuda when there is one, else cpu
    dtype: str = "bfloat16"  # parts 2-5: the reader's dtype (bfloat16 | float16 | float32)
    tiny: bool = False  # every shape tiny: the check in seconds on any machine
    vocab_size: int = 4000  # parts 1-4: tokens (V)
    d_model: int = 512  # parts 1-4: width d
    num_layers: int = 8  # parts 1-4: L, encoder and decoder each
    num_heads: int = 8  # parts 1-4: attention heads
    batch_size: int = 16  # parts 1-4: questions per step
    num_passages: int = 25  # k retrieved
    num_selected: int = 5  # m kept by GLIMMER; FiD reads k = m
    question_tokens: int = 32  # lq
    passage_tokens: int = 96  # lp
    answer_tokens: int = 12  # t
    timing_steps: int = 10  # timed calls per setting (after 2 untimed)
    inference: InferenceBenchmarkConfig = field(default_factory=t5_large_inference)  # part 5 (device, dtype: above)
    seed: int = 0  # weights and tokens
    output_dir: str = "outputs/check_gpu"  # check_gpu.json


TINY = dict(vocab_size=300, d_model=32, num_layers=2, num_heads=2, batch_size=2, num_passages=6, num_selected=2)
TINY.update(question_tokens=6, passage_tokens=12, answer_tokens=3, timing_steps=2)
TINY_INFERENCE = dict(question_tokens=8, passage_tokens=16, answer_tokens=3, batch_sizes=[1, 2], num_examples=2)
TINY_INFERENCE.update(warmup=1, model=ShapeConfig(vocab_size=128, d_model=32, num_layers=6, num_heads=2, d_ff=64))


def _reader(config: CheckGpuConfig, live_proportion: float, num_selected: int | None):
    shape = t5_1_1_config(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        dropout_rate=0.0,
    )
    return GlimmerForConditionalGeneration.from_t5(
        random_t5(shape, seed=config.seed),
        live_proportion=live_proportion,
        rerank_proportion=0.5,
        num_selected=num_selected,
    )


def _inputs(config: CheckGpuConfig) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(config.seed)
    b, k, lq, lp = config.batch_size, config.num_passages, config.question_tokens, config.passage_tokens
    passage_mask = torch.ones(b, k, lp, dtype=torch.long)
    tail = torch.randint(0, 2, (b, k, lp - lp // 2), generator=generator).cummin(-1).values  # ragged lengths
    passage_mask[:, :, lp // 2 :] = tail
    return {
        "question_ids": torch.randint(2, config.vocab_size, (b, lq), generator=generator),
        "question_mask": torch.ones(b, lq, dtype=torch.long),
        "passage_ids": torch.randint(2, config.vocab_size, (b, k, lp), generator=generator),
        "passage_mask": passage_mask,
        "labels": torch.randint(2, config.vocab_size, (b, config.answer_tokens), generator=generator),
    }


def _read(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """What `generate` reads: question ids and mask, passage ids and mask."""
    return tuple(inputs[key] for key in ("question_ids", "question_mask", "passage_ids", "passage_mask"))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(call, device: torch.device, repeats: int) -> float:
    """Median milliseconds of `call()` (2 untimed calls first)."""
    times = []
    for index in range(repeats + 2):
        _synchronize(device)
        start = time.perf_counter()
        call()
        _synchronize(device)
        if index >= 2:
            times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def _step_seconds(
    model, inputs: dict, device: torch.device, num_passages: int, pdist_weight: float, steps: int, dtype: torch.dtype
) -> float:
    """Median seconds of a training step reading the first `num_passages` passages (2 untimed steps first)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    batch = {
        **inputs,
        "passage_ids": inputs["passage_ids"][:, :num_passages],
        "passage_mask": inputs["passage_mask"][:, :num_passages],
    }
    times = []
    for step in range(steps + 2):
        _synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch, pdist_weight=pdist_weight).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        _synchronize(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(config: CheckGpuConfig) -> dict:
    # setup
    if config.tiny:
        config = dataclasses.replace(config, **TINY, inference=dataclasses.replace(config.inference, **TINY_INFERENCE))
    device, dtype = torch_device(config.device), torch_dtype(config.dtype)  # a GPU where there is none fails here
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict = {"config": to_dict(config), "device": name, "torch": torch.__version__}
    print(f"device {name}, torch {torch.__version__}, dtype {config.dtype}", flush=True)
    inputs = _inputs(config)
    on_device = {key: value.to(device) for key, value in inputs.items()}
    m, k = config.num_selected, config.num_passages

    # 1. fp32: the same weights on the CPU and on the device
    glimmer = _reader(config, 0.5, m).eval()
    cpu = glimmer(**inputs)
    cpu.loss.backward()
    cpu_gradient = glimmer.rerank_head.proj.weight.grad.clone()
    glimmer.zero_grad()
    cpu_tokens, _ = glimmer.generate(*_read(inputs), max_new_tokens=config.answer_tokens)
    glimmer.to(device)
    out = glimmer(**on_device)
    out.loss.backward()
    gradient = glimmer.rerank_head.proj.weight.grad.float().cpu()
    glimmer.zero_grad()
    tokens, encoding = glimmer.generate(*_read(on_device), max_new_tokens=config.answer_tokens)
    report["fp32"] = {
        "loss_cpu": cpu.loss.item(),
        "loss_device": out.loss.item(),
        "pdist_loss_cpu": cpu.pdist_loss.item(),
        "pdist_loss_device": out.pdist_loss.item(),
        "rerank_head_gradient_max_relative_difference": (
            (gradient - cpu_gradient).abs().max() / cpu_gradient.abs().max()
        ).item(),
        "greedy_tokens_equal": bool((tokens.cpu() == cpu_tokens).all()),
        "first_lm_loss": cpu.lm_loss.item(),
        "ln_vocab": math.log(config.vocab_size),
    }
    print("1. fp32, cpu against the device:", report["fp32"], flush=True)

    # 2. dtype: autocast against fp32, and a reader held in dtype weights
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        autocast = glimmer(**on_device)
    held = _reader(config, 0.5, m).eval().to(device, dtype)
    held_tokens, held_encoding = held.generate(*_read(on_device), max_new_tokens=config.answer_tokens)
    report["low_precision"] = {
        "autocast_loss": autocast.loss.item(),
        "autocast_loss_relative_difference": abs(autocast.loss.item() - out.loss.item()) / out.loss.item(),
        "scores_finite": bool(torch.isfinite(held_encoding.rerank_scores.float()).all()),
        "selected_equal_share": (held_encoding.selected.sort(1).values == encoding.selected.sort(1).values)
        .float()
        .mean()
        .item(),
        "tokens_equal_share": (held_tokens.cpu() == tokens.cpu()).float().mean().item(),
    }
    print(f"2. {config.dtype} against fp32:", report["low_precision"], flush=True)

    # 3. the serving path in dtype: memory encoding, live encoding with reranking, greedy generation
    b, lp = config.batch_size, config.passage_tokens
    passage_ids = on_device["passage_ids"].reshape(b * k, lp)
    passage_mask = on_device["passage_mask"].reshape(b * k, lp)
    with torch.no_grad():
        memory = held.encode_memory(passage_ids, passage_mask).reshape(b, k, lp, -1)
        encoded = held.encode(
            on_device["question_ids"],
            on_device["question_mask"],
            passage_mask=on_device["passage_mask"],
            passage_memory=memory,
        )
        stages = {
            "memory encoding (k passages)": lambda: held.encode_memory(passage_ids, passage_mask),
            f"live encoding + reranking {k} -> {m}": lambda: held.encode(
                on_device["question_ids"],
                on_device["question_mask"],
                passage_mask=on_device["passage_mask"],
                passage_memory=memory,
            ),
            f"greedy generation ({config.answer_tokens} tokens)": lambda: held.generate_from_encoding(
                encoded.hidden, encoded.mask, config.answer_tokens, config.answer_tokens
            ),
        }
        report["serving_ms_per_example"] = {
            stage: _median_ms(call, device, config.timing_steps) / b for stage, call in stages.items()
        }
    print(f"\n3. {'serving path, ' + config.dtype + ', median of ' + str(config.timing_steps):<48}{'ms/example':>11}")
    for stage, value in report["serving_ms_per_example"].items():
        print(f"{stage:<51}{value:11.3f}")

    # 4. training steps: LM + distillation, backward, AdamW, dtype autocast
    steps = config.timing_steps
    fid = _reader(config, 1.0, None).to(device)
    seconds = {f"FiD k={m}": _step_seconds(fid, on_device, device, m, 0.0, steps, dtype)}
    del fid
    seconds[f"GLIMMER {k}->{m}, no distillation"] = _step_seconds(glimmer, on_device, device, k, 0.0, steps, dtype)
    seconds[f"GLIMMER {k}->{m}, distillation"] = _step_seconds(glimmer, on_device, device, k, 1.0, steps, dtype)
    report["step_seconds"] = seconds
    report["distillation_overhead"] = (
        seconds[f"GLIMMER {k}->{m}, distillation"] / seconds[f"GLIMMER {k}->{m}, no distillation"]
    )
    print(
        f"\n4. {'training step (' + config.dtype + ' autocast, AdamW), median of ' + str(steps):<48}{'ms':>9}{'examples/s':>12}"
    )
    for setting, value in seconds.items():
        print(f"{setting:<51}{1e3 * value:9.1f}{config.batch_size / value:12.0f}")
    print(f"distillation overhead {report['distillation_overhead']:.2f}x", flush=True)
    del glimmer

    # 5. FiD / LUMEN / GLIMMER inference at T5-large shape
    print("\n5. inference, FiD / LUMEN / GLIMMER", flush=True)
    inference = dataclasses.replace(config.inference, device=str(device), dtype=config.dtype)
    report["inference"] = run_inference_benchmark(inference)
    write_report(os.path.join(config.output_dir, "check_gpu.json"), report)
    return report


if __name__ == "__main__":
    main(parse_job_args(CheckGpuConfig, __doc__.splitlines()[0], sys.argv[1:]))
