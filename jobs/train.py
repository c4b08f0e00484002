"""Multi-task GLIMMER training with Ray Train and DeepSpeed ZeRO.

    python jobs/train.py --config jobs/configs/train_quickstart.yaml
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train_quickstart.yaml

Setup: the tokenised multi-task stream (tasks sampled uniformly) from `jobs/prepare_data.py`'s output,
one TorchTrainer worker per `scaling.num_workers`. Loop (every worker): LM + perplexity-distillation
loss through a DeepSpeed engine (ZeRO 1/2/3, optional offload, bf16 where the hardware has it,
AdamW or Adafactor); logs every `log.every_steps`; every `checkpoint.every_steps` a sharded dev
evaluation, then every rank saves, a barrier, and `ray.train.report(metrics, checkpoint)`. A restarted
worker group resumes from the last checkpoint with optimiser state and data position. Cleanup: the
final model, ZeRO shards consolidated, exported in Hugging Face layout to `export_dir`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from glimmer_ray.config import parse_job_args, to_dict
from glimmer_ray.data.stream import tokenized_dataset
from glimmer_ray.train.config import TrainConfig, tokenize_config, train_paths
from glimmer_ray.train.worker import check_checkpoint_tokenizer, train_loop_per_worker


def main(config: TrainConfig) -> dict:
    # setup
    config.validate()
    config.resolve_paths()
    check_checkpoint_tokenizer(config.model.checkpoint, os.path.join(config.data.dir, "tokenizer"))
    ray.init(address=config.ray_address, ignore_reinit_error=True, log_to_driver=True)
    worker_cpus = config.scaling.num_workers * config.scaling.resources_per_worker.get("CPU", 1)
    if worker_cpus > ray.cluster_resources().get("CPU", 0) - 1:
        raise SystemExit(
            f"{config.scaling.num_workers} workers x {config.scaling.resources_per_worker.get('CPU', 1)} CPU leave no CPU of the "
            f"cluster's {ray.cluster_resources().get('CPU', 0):.0f} for the Ray Data stream, which would then hang; "
            "lower scaling.resources_per_worker.CPU (e.g. 0.5) or add CPUs"
        )
    train_dataset = tokenized_dataset(
        train_paths(config),
        os.path.join(config.data.dir, "tokenizer"),
        tokenize_config(config),
        rows_per_task=config.data.rows_per_task,
        seed=config.seed,
    )
    if config.data.cache:  # one pass of read, shuffle and tokenisation; every later epoch reads the object store
        train_dataset = train_dataset.materialize()
    storage = config.checkpoint.storage_path
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=to_dict(config),
        scaling_config=ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker=config.scaling.resources_per_worker,
            placement_strategy=config.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=config.checkpoint.name,
            storage_path=storage,
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

    # cleanup: export the final model
    summary = {
        "metrics": result.metrics,
        "seconds": seconds,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
    }
    if config.export_dir and result.checkpoint:
        with result.checkpoint.as_directory() as directory:
            source = os.path.join(directory, "hf")
            if os.path.isdir(source):
                shutil.rmtree(config.export_dir, ignore_errors=True)
                shutil.copytree(source, config.export_dir)
                summary["export_dir"] = config.export_dir
    print(json.dumps({k: v for k, v in summary.items()}, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main(parse_job_args(TrainConfig, __doc__.splitlines()[0], sys.argv[1:]))
