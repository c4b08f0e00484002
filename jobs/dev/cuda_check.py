"""Does the reader run on an accelerator as on the CPU, in fp32 and bf16, and what do its training steps cost there?

    python jobs/dev/cuda_check.py --config jobs/dev/configs/cuda_check.yaml

A device smoke check and measurement (torch and transformers only: it runs on a bare GPU machine). One random
GLIMMER reader (its T5.1.1 from `glimmer_ray.model.random_t5`) on random tokens:
1. the same weights in fp32 on the CPU and on `device`: loss, distillation loss, a scoring-head gradient, greedy
   tokens; and the first LM loss against ln(V), a uniform guess;
2. bf16 autocast against fp32 on `device`, and a reader held in bf16 weights: its selection and greedy tokens;
3. the median time of a training step (bf16 autocast, AdamW) of FiD k = m, GLIMMER k -> m without and with
   perplexity distillation: the distillation overhead, the ratio of the last two.
Prints each part and writes `output` as JSON.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch

from glimmer_ray.cli import write_report
from glimmer_ray.config import parse_job_args, to_dict
from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.model.random_t5 import random_t5, t5_1_1_config


@dataclass
class CudaCheckConfig:
    device: str | None = None  # torch device; null = cuda when there is one, else cpu
    vocab_size: int = 4000  # tokens (V)
    d_model: int = 512  # width d
    num_layers: int = 8  # L, encoder and decoder each
    num_heads: int = 8  # attention heads
    batch_size: int = 16  # questions per step
    num_passages: int = 25  # k retrieved
    num_selected: int = 5  # m kept by GLIMMER; FiD reads k = m
    question_tokens: int = 32  # lq
    passage_tokens: int = 96  # lp
    answer_tokens: int = 12  # t
    timing_steps: int = 10  # timed training steps per setting (after 2 untimed)
    seed: int = 0  # weights and tokens
    output: str = "outputs/cuda_check.json"  # JSON report


def _reader(config: CudaCheckConfig, live_proportion: float, num_selected: int | None):
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


def _inputs(config: CudaCheckConfig) -> dict[str, torch.Tensor]:
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
        torch.cuda.synchronize()


def _step_seconds(
    model, inputs: dict, device: torch.device, num_passages: int, pdist_weight: float, steps: int
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
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**batch, pdist_weight=pdist_weight).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        _synchronize(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(config: CudaCheckConfig) -> dict:
    # setup
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict = {"config": to_dict(config), "device": name, "torch": torch.__version__}
    print(f"device {name}, torch {torch.__version__}", flush=True)
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
    print("fp32:", report["fp32"], flush=True)

    # 2. bf16: autocast against fp32, and a reader held in bf16 weights
    with torch.autocast(device.type, dtype=torch.bfloat16):
        autocast = glimmer(**on_device)
    held = _reader(config, 0.5, m).eval().to(device, torch.bfloat16)
    held_tokens, held_encoding = held.generate(*_read(on_device), max_new_tokens=config.answer_tokens)
    report["bf16"] = {
        "autocast_loss": autocast.loss.item(),
        "autocast_loss_relative_difference": abs(autocast.loss.item() - out.loss.item()) / out.loss.item(),
        "bf16_scores_finite": bool(torch.isfinite(held_encoding.rerank_scores.float()).all()),
        "bf16_selected_equal_share": (held_encoding.selected.sort(1).values == encoding.selected.sort(1).values)
        .float()
        .mean()
        .item(),
        "bf16_tokens_equal_share": (held_tokens.cpu() == tokens.cpu()).float().mean().item(),
    }
    print("bf16:", report["bf16"], flush=True)
    del held

    # 3. training steps, bf16 autocast
    steps = config.timing_steps
    seconds = {f"FiD k={m}": _step_seconds(_reader(config, 1.0, None).to(device), on_device, device, m, 0.0, steps)}
    seconds[f"GLIMMER {k}->{m}, no distillation"] = _step_seconds(glimmer, on_device, device, k, 0.0, steps)
    seconds[f"GLIMMER {k}->{m}, distillation"] = _step_seconds(glimmer, on_device, device, k, 1.0, steps)
    report["step_seconds"] = seconds
    report["distillation_overhead"] = (
        seconds[f"GLIMMER {k}->{m}, distillation"] / seconds[f"GLIMMER {k}->{m}, no distillation"]
    )

    # report
    print(f"\n{'training step (bf16 autocast, AdamW), median of ' + str(steps):<48}{'ms':>9}{'examples/s':>12}")
    for setting, value in seconds.items():
        print(f"{setting:<48}{1e3 * value:9.1f}{config.batch_size / value:12.0f}")
    print(f"distillation overhead {report['distillation_overhead']:.2f}x", flush=True)
    write_report(config.output, report)
    return report


if __name__ == "__main__":
    main(parse_job_args(CudaCheckConfig, __doc__.splitlines()[0], sys.argv[1:]))
