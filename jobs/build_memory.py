"""Build the passage-memory store: passages -> tokenise -> memory encoder (Ray Data actor pool) -> shards.

    python jobs/build_memory.py --config jobs/configs/build_memory.yaml
    ray job submit --working-dir . -- python jobs/build_memory.py --config jobs/configs/build_memory.yaml

Re-running resumes a build that died (complete shards are kept) and adds passages that are new since
the last build as a new manifest version. Memory made by another checkpoint is refused.
"""

from __future__ import annotations

import sys

from glimmer_ray.cli import ray_session
from glimmer_ray.config import parse_job_args
from glimmer_ray.memory.build import BuildMemoryConfig, run_build_memory


def main(config: BuildMemoryConfig) -> dict:
    with ray_session(config.ray_address):
        return run_build_memory(config)


if __name__ == "__main__":
    main(parse_job_args(BuildMemoryConfig, __doc__.splitlines()[0], sys.argv[1:]))
