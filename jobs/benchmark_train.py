"""Training step benchmark: a DeepSpeed step against a plain PyTorch step, one worker, same model and data; and
what perplexity distillation adds to a GLIMMER step (k 25 -> m 5).

    python jobs/benchmark_train.py --config jobs/configs/benchmark_train.yaml
    ray job submit --working-dir . -- python jobs/benchmark_train.py --config jobs/configs/benchmark_train.yaml

Runs jobs/train.py's recipe (`glimmer_ray.train.run.run_training` of `train_config` plus `overrides`) once
per engine in `engines`, one after the other in this process and Ray session, on one worker for `steps`
optimiser steps, and reports each run's seconds per step and tokens per second over its training steps
(evaluation and checkpoint saving excluded), its first and last loss, and the ratio to the first engine.
With `distillation` set, it then times one GLIMMER training step with and without the distillation teacher
(`glimmer_ray.train.step_timing`, in this process, round-robin) and reports `distillation_overhead` (distil / reader
seconds per step). Writes everything as JSON to `output_dir/benchmark_train.json`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from glimmer_ray.cli import ray_session
from glimmer_ray.config import ConfigError, load_config, parse_job_args, to_dict
from glimmer_ray.train.config import TrainConfig
from glimmer_ray.train.run import run_training
from glimmer_ray.train.step_timing import DistillationTiming, time_distillation

ENGINES = ("deepspeed", "pytorch")


@dataclass
class BenchmarkTrainConfig:
    train_config: str = "jobs/configs/train_quickstart.yaml"  # the recipe timed (jobs/train.py's YAML)
    overrides: list[str] = field(default_factory=list)  # dotted overrides of that recipe, e.g. data.dir=outputs/qs
    engines: list[str] = field(
        default_factory=lambda: list(ENGINES)
    )  # deepspeed | pytorch; the first is the ratios' baseline
    steps: int = 60  # optimiser steps per engine
    output_dir: str = "outputs/quickstart/benchmark-train"  # runs, exports and benchmark_train.json
    distillation: DistillationTiming | None = field(
        default_factory=DistillationTiming
    )  # the distillation comparison (null: skip it)


def _run_config(config: BenchmarkTrainConfig, engine: str) -> TrainConfig:
    """The recipe on one worker for `steps` steps, evaluated once at the end, writing below `output_dir/engine`."""
    root = os.path.abspath(os.path.join(config.output_dir, engine))
    return load_config(
        TrainConfig,
        config.train_config,
        [
            *config.overrides,
            f"deepspeed.enabled={'true' if engine == 'deepspeed' else 'false'}",
            "scaling.num_workers=1",
            f"optim.max_steps={config.steps}",
            f"checkpoint.every_steps={config.steps}",
            f"log.every_steps={max(1, config.steps // 3)}",
            f"checkpoint.storage_path={root}",
            "checkpoint.name=run",
            f"export_dir={os.path.join(root, 'model')}",
            "failure.max_failures=0",
            "log.tensorboard=false",
        ],
    )


def main(config: BenchmarkTrainConfig) -> dict:
    # setup
    unknown = [engine for engine in config.engines if engine not in ENGINES]
    if unknown or (not config.engines and config.distillation is None):
        raise SystemExit(
            f"engines must be a list of {', '.join(ENGINES)} (empty only with distillation); got {config.engines}"
        )
    if config.steps < 1:
        raise SystemExit(f"steps must be at least 1, got {config.steps}")
    try:
        runs = {engine: _run_config(config, engine) for engine in config.engines}  # every config checked before any run
        for run in runs.values():
            run.validate()
    except (ConfigError, ValueError) as error:
        raise SystemExit(f"{config.train_config} with overrides {config.overrides}: {error}") from error
    if config.distillation is not None:
        try:
            config.distillation.validate()
        except ValueError as error:
            raise SystemExit(f"distillation: {error}") from error

    # loop: the engines one after the other, same recipe, same seed, one Ray session
    results = {}
    if runs:
        with ray_session(next(iter(runs.values())).ray_address, log_to_driver=True):
            for engine, run in runs.items():
                print(f"[benchmark_train] {engine}: {config.steps} steps on one worker", flush=True)
                summary = run_training(run)
                print(json.dumps(summary, indent=2, default=str))
                results[engine] = {
                    key: summary["metrics"][key]
                    for key in ("seconds_per_step", "tokens_per_second_per_worker", "first_loss", "train_loss", "step")
                }
        _print_engines(config, results)
    report = {"config": to_dict(config), "results": results}
    if config.distillation is not None:
        timing = config.distillation
        print(
            f"[benchmark_train] distillation: d {timing.d_model}, {timing.num_layers} layers, k {timing.num_passages} "
            f"-> m {timing.num_selected}, batch {timing.batch_size}, {timing.rounds} rounds of {timing.steps} steps",
            flush=True,
        )
        distillation = time_distillation(timing)
        _print_distillation(distillation)
        report["distillation"] = distillation
        report["distillation_overhead"] = distillation["distillation_overhead"]

    os.makedirs(config.output_dir, exist_ok=True)
    path = os.path.join(config.output_dir, "benchmark_train.json")
    with open(path, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {path}")
    return report


def _print_engines(config: BenchmarkTrainConfig, results: dict) -> None:
    base = results[config.engines[0]]["seconds_per_step"]
    print(
        f"\n{'engine':<10}{'s / step':>10}{'tokens/s':>10}{'first loss':>12}{'last loss':>11}{'time / ' + config.engines[0]:>18}"
    )
    for engine, result in results.items():
        result["time_ratio"] = result["seconds_per_step"] / base
        print(
            f"{engine:<10}{result['seconds_per_step']:10.3f}{result['tokens_per_second_per_worker']:10.0f}"
            f"{result['first_loss']:12.3f}{result['train_loss']:11.3f}{result['time_ratio']:18.2f}"
        )
    print("(one worker; training steps only, evaluation and checkpoint saving excluded; last loss: mean over the run)")


def _print_distillation(distillation: dict) -> None:
    print(f"\n{'GLIMMER training step':<52}{'s / step':>10}{'time / reader':>15}")
    labels = {
        "reader": "reader (no distillation)",
        "distil": "+ distillation, teacher reads on from live stage A",
        "distil_recompute": "+ distillation, teacher recomputes memory + stage A",
    }
    for name, row in distillation["rows"].items():
        print(f"{labels[name]:<52}{row['seconds_per_step']:10.3f}{row['time_over_reader']:15.2f}")
    print(f"distillation_overhead {distillation['distillation_overhead']:.2f} (median of the rounds)")


if __name__ == "__main__":
    main(parse_job_args(BenchmarkTrainConfig, __doc__.splitlines()[0], sys.argv[1:]))
