"""Build the passage-memory store: passages -> tokenise -> memory encoder (Ray Data actor pool) -> shards.

    python jobs/build_memory.py --config jobs/configs/build_memory.yaml
    ray job submit --working-dir . -- python jobs/build_memory.py --config jobs/configs/build_memory.yaml

Re-running resumes a build that died (complete shards are kept) and adds passages that are new since
the last build as a new manifest version. Memory made by another checkpoint is refused.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import ray

from glimmer_ray.config import parse_job_args, to_dict
from glimmer_ray.memory.build import build_memory


@dataclass
class BuildMemoryConfig:
    passages: str = "outputs/quickstart/passages.parquet"  # jobs/prepare_data.py output
    model_dir: str = "outputs/quickstart/model"  # trained reader (Hugging Face layout)
    tokenizer_dir: str = "outputs/quickstart/tokenizer"  # the reader's tokenizer
    store: str = "outputs/quickstart/memory"  # local directory or s3:// / gs:// URI
    passage_tokens: int = 96  # lp, as the reader was trained
    codec: str = "fp32"  # fp32 | bf16 | fp16 | int8 | pq
    pq_subvectors: int = 16  # pq: bytes per token (divides d_model)
    shard_size: int = 1024  # passages per shard
    batch_size: int = 32  # passages per memory-encoder call
    concurrency: int = 1  # encoder actors
    num_cpus_per_actor: float = 1.0  # CPUs per encoder actor
    num_gpus_per_actor: float = 0.0  # GPUs per encoder actor (0: CPU)
    report: str | None = None  # JSON report path; null = <store>/build_report.json when local
    ray_address: str | None = None  # null: the cluster of `ray job submit`, else a new local one


def main(config: BuildMemoryConfig) -> dict:
    # setup
    started_ray = not ray.is_initialized()
    ray.init(address=config.ray_address, ignore_reinit_error=True, log_to_driver=False)
    cpus = ray.cluster_resources().get("CPU", 0)
    if config.num_gpus_per_actor == 0 and config.concurrency * config.num_cpus_per_actor >= cpus:
        raise SystemExit(
            f"{config.concurrency} encoder actors x {config.num_cpus_per_actor} CPU would take all {cpus:.0f} CPUs "
            "and leave none for the stream; use fewer actors or fewer CPUs each"
        )

    # build
    report = build_memory(
        config.passages,
        config.store,
        config.model_dir,
        config.tokenizer_dir,
        config.passage_tokens,
        codec=config.codec,
        codec_params={"num_subvectors": config.pq_subvectors},
        shard_size=config.shard_size,
        batch_size=config.batch_size,
        concurrency=config.concurrency,
        num_cpus_per_actor=config.num_cpus_per_actor,
        num_gpus_per_actor=config.num_gpus_per_actor,
    )
    report["config"] = to_dict(config)
    if report.get("passages_encoded"):
        print(
            f"[build_memory] version {report['version']}: {report['passages_encoded']} passages, {report['tokens_encoded']} tokens "
            f"encoded at {report['passages_per_second']:.1f} passages/s, {report['tokens_per_second']:.0f} tokens/s per actor; "
            f"{report['shards_written']} shards written, {report['shards_reused']} reused; store {report['passages_total']} passages, "
            f"{report['bytes'] / 2**20:.2f} MiB; {report['wall_seconds']:.1f} s in all"
        )
    path = config.report or (os.path.join(config.store, "build_report.json") if "://" not in config.store else None)
    if path:
        with open(path, "w") as handle:
            json.dump(report, handle, indent=2, default=str)
        print(f"wrote {path}")

    # cleanup
    if started_ray:
        ray.shutdown()
    return report


if __name__ == "__main__":
    main(parse_job_args(BuildMemoryConfig, __doc__.splitlines()[0], sys.argv[1:]))
