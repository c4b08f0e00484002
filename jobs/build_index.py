"""Build the retrieval index of a prepared directory: passages -> embeddings -> FAISS index -> top-k per example.

    python jobs/build_index.py --config jobs/configs/build_index.yaml
    ray job submit --working-dir . -- python jobs/build_index.py --config jobs/configs/build_index.yaml

Reads data/ and passages.parquet of jobs/prepare_data.py's output (which runs these stages last, unless
build_index=false) and writes index/, retrieved/ and index_report.json beside them; finished stages are
reused unless overwrite=true (`glimmer_ray.retrieval.build`).
"""

from __future__ import annotations

import sys

from glimmer_ray.cli import ray_session
from glimmer_ray.config import parse_job_args
from glimmer_ray.retrieval.build import BuildIndexConfig, build_index


def main(config: BuildIndexConfig) -> dict:
    with ray_session(config.ray_address):
        return build_index(config)


if __name__ == "__main__":
    main(parse_job_args(BuildIndexConfig, __doc__.splitlines()[0], sys.argv[1:]))
