"""Prepare data for the reader: benchmark (or KILT files) -> tokenizer -> passages -> FAISS index -> top-k per example.

    python jobs/prepare_data.py --config jobs/configs/prepare_data.yaml
    ray job submit --working-dir . -- python jobs/prepare_data.py --config jobs/configs/prepare_data.yaml

Writes data/ (KILT formats), tokenizer/, passages.parquet, then, unless build_index=false, the build_index
job's index/, retrieved/ and index_report.json, and data_report.json, all under output_dir; finished
stages are reused unless overwrite=true (`glimmer_ray.data.prepare`).
"""

from __future__ import annotations

import sys

from glimmer_ray.cli import ray_session
from glimmer_ray.config import parse_job_args
from glimmer_ray.data.prepare import PrepareConfig, prepare_data


def main(config: PrepareConfig) -> dict:
    if not config.build_index:  # the stages before the index run in this process: no cluster needed
        return prepare_data(config)
    with ray_session(config.ray_address):
        return prepare_data(config)


if __name__ == "__main__":
    main(parse_job_args(PrepareConfig, __doc__.splitlines()[0], sys.argv[1:]))
