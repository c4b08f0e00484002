"""Prepare many SynthKILT worlds for the reader: fresh names, facts and pages per world, one tokenizer, each world
retrieved in its own index; training worlds make the train stream, held-out worlds the dev set.

    python jobs/prepare_worlds.py --config jobs/configs/prepare_worlds.yaml
    ray job submit --working-dir . -- python jobs/prepare_worlds.py --config jobs/configs/prepare_worlds.yaml

Writes tokenizer/, worlds/<train|dev>-<seed>/, retrieved/<task>-{train,dev}.parquet, the held-out worlds'
passages.parquet and index/, and worlds_report.json under output_dir; a re-run (or a run after a kill) reuses
every finished world (`glimmer_ray.data.worlds`).
"""

from __future__ import annotations

import sys

from glimmer_ray.cli import ray_session
from glimmer_ray.config import parse_job_args
from glimmer_ray.data.worlds import WorldsConfig, prepare_worlds


def main(config: WorldsConfig) -> dict:
    config.validate()
    with ray_session(config.ray_address):
        return prepare_worlds(config)


if __name__ == "__main__":
    main(parse_job_args(WorldsConfig, __doc__.splitlines()[0], sys.argv[1:]))
