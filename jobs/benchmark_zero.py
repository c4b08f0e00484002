"""ZeRO-3 memory benchmark: what each training worker holds while a T5.1.1 of a configurable size is built from its
checkpoint under ZeRO-3 and trained a few steps, against the model's fp32 size and what ZeRO-3 predicts.

    python jobs/benchmark_zero.py --config jobs/configs/benchmark_zero.yaml
    ray job submit --working-dir . -- python jobs/benchmark_zero.py --config jobs/configs/benchmark_zero.yaml

Setup: a random T5.1.1 of `model`'s shape is saved once as a sharded safetensors checkpoint (`max_shard_size`),
as Hugging Face writes large models. Loop: for each number of workers in `world_sizes` and each construction in
`constructions`, Ray Train starts that many CPU workers, each running the training job's own set-up
(`glimmer_ray.train.worker.build_training_model`: GLIMMER from the checkpoint under ZeRO-3, then
`wrap_training_model`: `deepspeed.initialize`) and then
`steps` training steps (LM + distillation, backward, optimiser) on random tokens. Each worker reads its resident
memory from /proc/self/status (high-water marks reset between phases through /proc/self/clear_refs):

    before          RSS once Python, torch, DeepSpeed (communication initialised) and the Ray worker are loaded
    build           the peak over model construction and checkpoint loading (`build_training_model`)
    initialize      the peak over `deepspeed.initialize`: ZeRO-3 flattens the partitions and allocates this rank's
                    fp32 copy and gradient partition here (stage3.py `_setup_for_real_optimizer`)
    steps           the peak over the training steps (the optimiser's state appears at the first): the largest of
                    its parts' peaks, each measured alone: fwd (forward, with the distillation teacher), bwd
                    (backward, with ZeRO-3's gradient reduction), opt (the optimiser's step)

    partitioned     deepspeed.zero3_init true: built under deepspeed.zero.Init, each rank reading only its slices
    replicated      deepspeed.zero3_init false: the whole model built on every rank, then partitioned by
                    deepspeed.initialize (how ZeRO-1/2 and a from-scratch model start)

ZeRO-3's prediction of a worker's peak over the steps (fp32 on CPU, no offload): `before`, plus one rank's share of the
model states, (4 bytes of parameters + 4 of the optimiser's fp32 copy of them + 4 of gradients + the optimiser's
state) x N / world size, plus the gathered parameters kept alive between uses, 4 bytes x min(N, `live_parameters`).
DeepSpeed keeps the fp32 copy even when the parameters are fp32 on a CPU (stage3.py `_create_fp32_partitions`); the
optimiser's state is 8 bytes a parameter for AdamW (two moments) and 4 for Adafactor (ZeRO-3 hands the optimiser flat
1-D partitions, so its second moment is not factored, and the paper's Adafactor keeps no first moment). Activations,
communication buffers and the optimiser's temporaries (bounded by the sub-group size) are left out: with
`activation_checkpointing` (the default, as for T5-XXL) a block's activations live only while it is recomputed.

Writes output_dir/benchmark_zero.json; its top-level `peak_rss_over_fp32`, `initialize_peak_rss_over_fp32` and
`step_peak_rss_over_fp32` are the largest worker's build, initialize and step peaks over the fp32 model size
(partitioned, at the largest world size), `step_peak_over_predicted` the largest step peak over the prediction.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

from glimmer_ray.cli import ray_session
from glimmer_ray.config import parse_job_args, to_dict
from glimmer_ray.train.memory_usage import measure_worker, read_records

CONSTRUCTIONS = ("partitioned", "replicated")
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adafactor": 4}  # per parameter, on ZeRO-3's flat fp32 partitions


@dataclass
class ZeroModel:
    d_model: int = 1024  # T5.1.1-large: 783M parameters, 3.1 GB in fp32
    num_layers: int = 24  # encoder layers, and as many decoder layers
    num_heads: int = 16
    d_ff: int = 2816  # gated feed-forward width
    vocab_size: int = 32128


@dataclass
class BenchmarkZeroConfig:
    model: ZeroModel = field(default_factory=ZeroModel)
    world_sizes: list[int] = field(default_factory=lambda: [1, 2])  # ZeRO-3 workers, one run each
    constructions: list[str] = field(default_factory=lambda: list(CONSTRUCTIONS))  # partitioned | replicated
    optimizer: str = "adafactor"  # adafactor | adamw
    steps: int = 2  # training steps after construction
    batch_size: int = 1  # examples per worker per step
    num_passages: int = 4  # k
    num_selected: int = 2  # m
    question_tokens: int = 16
    passage_tokens: int = 64
    answer_tokens: int = 8
    live_parameters: int = 100_000_000  # ZeRO-3: gathered parameter elements kept alive between uses (job default 1e9)
    activation_checkpointing: bool = True  # each T5 block recomputed in backward (train_t5xxl_gpu.yaml's setting)
    max_shard_size: str = "500MB"  # the checkpoint's safetensors files
    output_dir: str = "outputs/benchmark-zero"  # the checkpoint (reused), the runs and benchmark_zero.json
    ray_address: str | None = None  # null: the cluster of `ray job submit`, else a new local one


def _checkpoint(config: BenchmarkZeroConfig) -> tuple[str, int]:
    """The random T5.1.1 of the configured shape as a sharded checkpoint (saved once, reused while the shape holds)
    and its number of parameters (counted in the files: T5.1.1's output layer is its own)."""
    from transformers import AutoConfig

    from glimmer_ray.model.random_t5 import random_t5, t5_1_1_config
    from glimmer_ray.train.zero3 import checkpoint_files, safetensors_header

    shape = config.model
    wanted = t5_1_1_config(
        vocab_size=shape.vocab_size,
        d_model=shape.d_model,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        d_ff=shape.d_ff,
    )
    directory = os.path.join(os.path.abspath(config.output_dir), "t5-checkpoint")
    keys = ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff")
    saved = AutoConfig.from_pretrained(directory) if os.path.exists(os.path.join(directory, "config.json")) else None
    if saved is not None and all(getattr(saved, key) == getattr(wanted, key) for key in keys):
        print(f"[benchmark_zero] reusing {directory}", flush=True)
    else:
        print(f"[benchmark_zero] saving a random T5.1.1 of this shape to {directory}", flush=True)
        start = time.perf_counter()
        random_t5(wanted).save_pretrained(directory, max_shard_size=config.max_shard_size)
        print(f"[benchmark_zero] saved in {time.perf_counter() - start:.0f} s", flush=True)
    parameters = sum(
        math.prod(entry["shape"])
        for path in checkpoint_files(directory)
        for entry in safetensors_header(path)[0].values()
    )
    print(f"[benchmark_zero] {parameters / 1e6:.0f}M parameters", flush=True)
    return directory, parameters


def _train_config(config: BenchmarkZeroConfig, checkpoint: str, world_size: int, construction: str) -> dict:
    """The training job's config for one run: the checkpoint under ZeRO-3 on `world_size` CPU workers."""
    from glimmer_ray.train.config import TrainConfig

    train = TrainConfig()
    train.model.checkpoint = checkpoint
    train.model.num_selected = config.num_selected
    train.optim.optimizer = config.optimizer
    train.optim.batch_size = config.batch_size
    train.optim.warmup_steps = 0
    train.deepspeed.zero_stage = 3
    train.deepspeed.zero3_init = construction == "partitioned"
    train.deepspeed.live_parameters = config.live_parameters
    train.optim.activation_checkpointing = config.activation_checkpointing
    train.scaling.num_workers = world_size
    return to_dict(train)


def _run(config: BenchmarkZeroConfig, checkpoint: str, world_size: int, construction: str) -> list[dict]:
    """One run of `world_size` Ray Train workers; their records, by rank."""
    import ray.train
    from ray.train.torch import TorchTrainer

    result = TorchTrainer(
        measure_worker,
        train_loop_config={
            "train": _train_config(config, checkpoint, world_size, construction),
            "bench": to_dict(config),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=world_size, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            storage_path=os.path.join(os.path.abspath(config.output_dir), "runs"),
            name=f"{construction}-{world_size}",
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    ).fit()
    if result.error is not None:
        raise SystemExit(f"[benchmark_zero] {construction} on {world_size} workers failed: {result.error}")
    return read_records(result.checkpoint)


def main(config: BenchmarkZeroConfig) -> dict:
    # setup
    unknown = [c for c in config.constructions if c not in CONSTRUCTIONS]
    if unknown or not config.constructions:
        raise SystemExit(
            f"constructions must be a non-empty list of {', '.join(CONSTRUCTIONS)}; got {config.constructions}"
        )
    if not config.world_sizes or any(size < 1 for size in config.world_sizes):
        raise SystemExit(f"world_sizes must be a non-empty list of positive worker counts; got {config.world_sizes}")
    if config.optimizer not in OPTIMIZER_STATE_BYTES:
        raise SystemExit(f"optimizer must be one of {', '.join(OPTIMIZER_STATE_BYTES)}; got {config.optimizer!r}")
    if config.steps < 1 or not 1 <= config.num_selected <= config.num_passages:
        raise SystemExit(
            f"need steps >= 1 and 1 <= num_selected <= num_passages; got {config.steps}, {config.num_selected}, "
            f"{config.num_passages}"
        )
    os.makedirs(config.output_dir, exist_ok=True)
    checkpoint, parameters = _checkpoint(config)
    fp32_gib = 4 * parameters / 2**30
    state_bytes = 4 + 4 + 4 + OPTIMIZER_STATE_BYTES[config.optimizer]  # parameters, fp32 copy, gradients, optimiser
    live_gib = 4 * min(parameters, config.live_parameters) / 2**30  # gathered parameters alive on every rank

    # loop: every world size and construction, one after the other in one Ray session
    rows = []
    with ray_session(config.ray_address, log_to_driver=True):
        for world_size in config.world_sizes:
            for construction in config.constructions:
                print(f"[benchmark_zero] {construction} construction on {world_size} ZeRO-3 workers", flush=True)
                workers = _run(config, checkpoint, world_size, construction)
                for record in workers:
                    predicted = record["before_gib"] + state_bytes * parameters / world_size / 2**30 + live_gib
                    record["predicted_gib"] = predicted
                    for phase in ("build", "initialize", "step"):
                        record[f"{phase}_peak_over_fp32"] = record[f"{phase}_peak_gib"] / fp32_gib
                    record["initialize_peak_over_predicted"] = record["initialize_peak_gib"] / predicted
                    record["step_peak_over_predicted"] = record["step_peak_gib"] / predicted
                rows.append({"construction": construction, "world_size": world_size, "workers": workers})
                _print_rows(rows[-1:], fp32_gib, header=len(rows) == 1)

    # cleanup: the table and the JSON
    print()
    _print_rows(rows, fp32_gib, header=True)
    print(
        f"(GiB per worker: RSS before the model, then each phase's peak; {parameters / 1e6:.0f}M parameters, fp32 size "
        f"{fp32_gib:.2f} GiB; predicted: RSS before + {state_bytes} bytes x N / workers ({config.optimizer}) + "
        f"{live_gib:.2f} GiB of live gathered parameters)"
    )
    report = {
        "config": to_dict(config),
        "parameters": parameters,
        "fp32_gib": fp32_gib,
        "model_state_bytes_per_parameter": state_bytes,
        "live_parameters_gib": live_gib,
        "rows": rows,
    }
    partitioned = [row for row in rows if row["construction"] == "partitioned"]
    if partitioned:
        largest = max(partitioned, key=lambda row: row["world_size"])
        report["world_size"] = largest["world_size"]
        workers = largest["workers"]
        report["peak_rss_over_fp32"] = max(w["build_peak_over_fp32"] for w in workers)
        report["initialize_peak_rss_over_fp32"] = max(w["initialize_peak_over_fp32"] for w in workers)
        report["step_peak_rss_over_fp32"] = max(w["step_peak_over_fp32"] for w in workers)
        report["step_peak_over_predicted"] = max(w["step_peak_over_predicted"] for w in workers)
        print(
            f"peak_rss_over_fp32 {report['peak_rss_over_fp32']:.2f} (build), initialize_peak_rss_over_fp32 "
            f"{report['initialize_peak_rss_over_fp32']:.2f}, step_peak_rss_over_fp32 "
            f"{report['step_peak_rss_over_fp32']:.2f}, step_peak_over_predicted {report['step_peak_over_predicted']:.2f} "
            f"(partitioned, {largest['world_size']} workers, largest worker)"
        )
    path = os.path.join(config.output_dir, "benchmark_zero.json")
    with open(path, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {path}")
    return report


def _print_rows(rows: list[dict], fp32_gib: float, header: bool) -> None:
    if header:
        print(
            f"{'construction':<13}{'workers':>8}{'rank':>5}{'before':>8}{'build':>8}{'/fp32':>9}{'init':>8}{'/fp32':>9}"
            f"{'fwd':>7}{'bwd':>7}{'opt':>7}{'steps':>8}{'/fp32':>9}{'predicted':>10}{'steps/pred':>11}{'build s':>8}{'init s':>8}{'s/step':>8}"
        )
    for row in rows:
        for w in row["workers"]:
            print(
                f"{row['construction']:<13}{row['world_size']:>8}{w['rank']:>5}{w['before_gib']:8.2f}"
                f"{w['build_peak_gib']:8.2f}{w['build_peak_over_fp32']:9.2f}"
                f"{w['initialize_peak_gib']:8.2f}{w['initialize_peak_over_fp32']:9.2f}"
                f"{w['forward_peak_gib']:7.2f}{w['backward_peak_gib']:7.2f}{w['optimizer_peak_gib']:7.2f}"
                f"{w['step_peak_gib']:8.2f}{w['step_peak_over_fp32']:9.2f}{w['predicted_gib']:10.2f}"
                f"{w['step_peak_over_predicted']:11.2f}{w['build_seconds']:8.1f}{w['initialize_seconds']:8.1f}"
                f"{w['seconds_per_step']:8.1f}"
            )


if __name__ == "__main__":
    main(parse_job_args(BenchmarkZeroConfig, __doc__.splitlines()[0], sys.argv[1:]))
