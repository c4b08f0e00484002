"""Export a checkpoint of a training run as a model directory (Hugging Face layout, tokenizer, reading.json).

    python jobs/export.py --config jobs/configs/export.yaml
    python jobs/export.py train_config=jobs/configs/train_learning.yaml checkpoint=outputs/runs/learning/checkpoint_...

For a run stopped early, or a checkpoint better than the last: the ZeRO shards (any stage) are consolidated to
fp32 as the run's final export would be (`glimmer_ray.train.run.run_export`). Needs no Ray cluster.
"""

from __future__ import annotations

import sys

from glimmer_ray.config import parse_job_args
from glimmer_ray.train.run import ExportConfig, run_export


def main(config: ExportConfig) -> str:
    return run_export(config)


if __name__ == "__main__":
    main(parse_job_args(ExportConfig, __doc__.splitlines()[0], sys.argv[1:]))
