"""Multi-task GLIMMER training with Ray Train and DeepSpeed ZeRO.

    python jobs/train.py --config jobs/configs/train_quickstart.yaml
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train_quickstart.yaml

Setup: the tokenised multi-task stream (tasks sampled uniformly) from `jobs/prepare_data.py`'s output,
one TorchTrainer worker per `scaling.num_workers`. Loop (every worker): LM + perplexity-distillation
loss through a DeepSpeed engine (ZeRO 1/2/3, optional offload, bf16 where the hardware has it,
AdamW or Adafactor); logs every `log.every_steps`; every `checkpoint.every_steps` a sharded dev
evaluation, then every rank saves, a barrier, and `ray.train.report(metrics, checkpoint)`. A restarted
worker group resumes from the last checkpoint with optimiser state and data position. Cleanup: the
final model, ZeRO shards consolidated, exported in Hugging Face layout with the reading settings it was
trained with (`reading.json`) to `export_dir`. The recipe is `glimmer_ray.train.run.run_training`, the
worker's loop `glimmer_ray.train.worker.TrainLoopRunner`.
"""

from __future__ import annotations

import json
import sys

from glimmer_ray.cli import ray_session
from glimmer_ray.config import parse_job_args
from glimmer_ray.train.config import TrainConfig
from glimmer_ray.train.run import run_training


def main(config: TrainConfig) -> dict:
    with ray_session(config.ray_address, log_to_driver=True):
        summary = run_training(config)
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main(parse_job_args(TrainConfig, __doc__.splitlines()[0], sys.argv[1:]))
