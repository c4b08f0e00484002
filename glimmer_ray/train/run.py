"""The training job as one library function: `run_training(config)` checks the config and the cluster, streams
the tokenised multi-task data to a `TorchTrainer` of `train_loop_per_worker` workers, fits it, and copies the
final export (model, tokenizer, reading.json) to `export_dir`.

It never starts or stops Ray: the caller holds the session (`glimmer_ray.cli.ray_session`), so one session can
run several trainings (jobs/benchmark_train.py).
"""

from __future__ import annotations

import glob
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from glimmer_ray.cli import check_spare_cpu
from glimmer_ray.config import load_config, to_dict
from glimmer_ray.data.stream import tokenized_dataset
from glimmer_ray.train.config import TrainConfig, tokenize_config, train_paths
from glimmer_ray.train.worker import check_checkpoint_tokenizer, export_checkpoint, train_loop_per_worker


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Train as `config` says on the connected Ray cluster. Returns the last report's `metrics`, the fit's
    `seconds`, the last `checkpoint` path, and `export_dir` when the final model was copied there."""
    # setup
    config.validate()
    config.resolve_paths()
    tokenizer_dir = os.path.join(config.data.dir, "tokenizer")
    check_checkpoint_tokenizer(config.model.checkpoint, tokenizer_dir)
    scaling = config.scaling
    worker_cpus = scaling.resources_per_worker.get("CPU", 1)
    check_spare_cpu(
        scaling.num_workers * worker_cpus,
        f"{scaling.num_workers} training workers x {worker_cpus} CPU",
        "lower scaling.resources_per_worker.CPU (e.g. 0.5) or add CPUs",
    )
    train_dataset = tokenized_dataset(
        train_paths(config),
        tokenizer_dir,
        tokenize_config(config),
        rows_per_task=config.data.rows_per_task,
        seed=config.seed,
    )
    if config.data.cache:  # one pass of read, shuffle and tokenisation; every later epoch reads the object store
        train_dataset = train_dataset.materialize()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=to_dict(config),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=scaling.resources_per_worker,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=config.checkpoint.name,
            storage_path=config.checkpoint.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.checkpoint.num_to_keep,
                checkpoint_score_attribute=config.checkpoint.score_attribute,
                checkpoint_score_order=config.checkpoint.score_order,
            ),
            failure_config=FailureConfig(max_failures=config.failure.max_failures),
        ),
        datasets={"train": train_dataset},
    )

    # loop
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start

    # cleanup: the final model (exported by the workers into the last checkpoint's hf/), or the best kept checkpoint's
    summary = {
        "metrics": result.metrics,
        "seconds": seconds,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
    }
    if config.export_dir and result.checkpoint:
        chosen = result.checkpoint
        if config.checkpoint.export == "best":
            chosen, metrics = best_checkpoint(result.best_checkpoints or [], config.checkpoint, result.checkpoint)
            summary["exported_metrics"] = metrics
        summary["exported_checkpoint"] = chosen.path
        with chosen.as_directory() as directory:
            source = os.path.join(directory, "hf")
            if os.path.isdir(source):
                shutil.rmtree(config.export_dir, ignore_errors=True)
                shutil.copytree(source, config.export_dir)
            else:  # an earlier step's checkpoint: consolidate its ZeRO shards as jobs/export.py would
                shutil.rmtree(config.export_dir, ignore_errors=True)
                export_checkpoint(config, directory, config.export_dir)
            summary["export_dir"] = config.export_dir
        print(f"[train] exported {chosen.path} ({config.checkpoint.export}) to {config.export_dir}", flush=True)
    return summary


def best_checkpoint(kept: list[tuple[Any, dict]], section: Any, last: Any) -> tuple[Any, dict]:
    """The kept (checkpoint, metrics) pair ranked first by `section.score_attribute` in `section.score_order`
    (on a tie the newest: Ray names checkpoint directories by time); `last` when none reports the attribute."""
    scored = [(checkpoint, metrics) for checkpoint, metrics in kept if section.score_attribute in metrics]
    if not scored:
        return last, {}
    sign = 1.0 if section.score_order == "max" else -1.0
    return max(scored, key=lambda pair: (sign * float(pair[1][section.score_attribute]), pair[0].path))


@dataclass
class ExportConfig:
    train_config: str = "jobs/configs/train_quickstart.yaml"  # the recipe the run was trained with
    train_overrides: list[str] = field(default_factory=list)  # its dotted overrides, as given to jobs/train.py
    checkpoint: str | None = None  # a checkpoint directory of the run; null = its newest (checkpoint.storage_path/name)
    export_dir: str | None = None  # where the model goes (Hugging Face layout); null = the recipe's export_dir


def run_export(config: ExportConfig) -> str:
    """Export a checkpoint of a training run (a run stopped early, or a step better than the last) as the run's
    final export would be; returns the export directory. Needs no Ray cluster."""
    train = load_config(TrainConfig, config.train_config, config.train_overrides)
    train.resolve_paths()
    checkpoint = config.checkpoint
    if checkpoint is None:
        run_dir = os.path.join(train.checkpoint.storage_path, train.checkpoint.name)
        found = sorted(p for p in glob.glob(os.path.join(run_dir, "checkpoint_*")) if os.path.isdir(p))  # named by time
        if not found:
            raise SystemExit(f"no checkpoint under {run_dir}: give checkpoint=DIR")
        checkpoint = found[-1]
    export_dir = os.path.abspath(config.export_dir or train.export_dir or "")
    if not export_dir:
        raise SystemExit("no export_dir: give export_dir=DIR")
    print(f"[export] {checkpoint} -> {export_dir}", flush=True)
    return export_checkpoint(train, checkpoint, export_dir)
