"""What every job script shares: its Ray session, the CPU checks that keep a Ray Data stream alive on a
small cluster, and the reuse of finished stages.

Jobs (`jobs/*.py`) are recipes: each parses its config, then calls library functions inside
`ray_session`. They never import each other; orchestration two jobs share lives in the library.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator


@contextlib.contextmanager
def ray_session(address: str | None = None, log_to_driver: bool = False) -> Iterator[None]:
    """Connect to the cluster at `address` (null: the cluster of `ray job submit`, else a new local one)
    and shut down only a connection this job made: a caller that already holds one keeps it."""
    import ray  # here, not at the top: write_report also serves scripts run where Ray is not installed

    started = not ray.is_initialized()
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=log_to_driver)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


def check_spare_cpu(taken: float, what: str, advice: str) -> None:
    """Refuse a job whose actors or workers would take `taken` CPUs and leave the cluster none for its
    Ray Data stream, which would then wait for a CPU forever instead of failing."""
    cpus = cluster_cpus()
    if taken > cpus - 1:
        raise SystemExit(
            f"{what} would take {taken:g} of the cluster's {cpus:.0f} CPUs and leave less than one for the Ray Data "
            f"stream, which would then hang; {advice}"
        )


def run_stage(name: str, output: str, overwrite: bool) -> bool:
    """True when a stage must run; prints why it is skipped when its `output` exists already."""
    if os.path.exists(output) and not overwrite:
        print(f"[{name}] reusing {output}")
        return False
    print(f"[{name}] ...", flush=True)
    return True


def write_report(path: str, report: dict) -> str:
    """Write a job's report as indented JSON (values JSON cannot hold as their str), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    print(f"wrote {path}")
    return path
