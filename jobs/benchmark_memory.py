"""Memory-store benchmark: per codec, bytes per token, reconstruction error, dev quality, read latency and throughput.

    python jobs/benchmark_memory.py --config jobs/configs/benchmark_memory.yaml
    ray job submit --working-dir . -- python jobs/benchmark_memory.py --config jobs/configs/benchmark_memory.yaml

For every codec the store is built (or reused) from the same trained reader, then measured side by side:
bytes per token and compression against fp32; max and mean reconstruction error against the fp32 memory;
dev exact match and the reranker's recall@m when the reader reads the stored memory (and, as the
reference, when it encodes the passages itself); random-access latency for k passages, cold (a fresh
store object) and through the LRU cache; sequential decode throughput against `cat` of the same files (with
`scan_copies` N, of a store holding the codec's rows N times: the scan of a corpus larger than the quickstart's).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from transformers import AutoTokenizer

from glimmer_ray.cli import ray_session, write_report
from glimmer_ray.config import parse_job_args, to_dict
from glimmer_ray.data import synthkilt
from glimmer_ray.data.reading import ReadingConfig, load_reading
from glimmer_ray.data.stream import TokenizeConfig
from glimmer_ray.eval.evaluate import dev_batches, predict, score_predictions
from glimmer_ray.eval.metrics import prediction_recall
from glimmer_ray.memory.build import build_memory
from glimmer_ray.memory.store import MANIFEST, PQ_CENTROIDS, LRUMemoryCache, MemoryStore, write_shard
from glimmer_ray.model import GlimmerForConditionalGeneration


@dataclass
class BenchmarkMemoryConfig:
    data_dir: str = "outputs/quickstart"  # jobs/prepare_data.py output (passages, tokenizer, retrieved)
    model_dir: str = "outputs/quickstart/model"  # trained reader
    output_dir: str = "outputs/quickstart/memory-benchmark"  # one store per codec + benchmark_memory.json
    codecs: list[str] = field(default_factory=lambda: ["fp32", "bf16", "fp16", "int8", "pq"])  # fp32 is the reference
    pq_subvectors: int = 16  # pq bytes per token
    tasks: list[str] = field(default_factory=lambda: list(synthkilt.TASKS))
    limit_per_task: int | None = 60  # dev examples per task; null = all
    latency_passages: int = 25  # k fetched per random-access request
    latency_trials: int = 50  # requests timed per setting
    cache_bytes: int = 268435456  # LRU budget for the cached setting (bytes)
    shard_size: int = 1024  # passages per shard
    scan_copies: int = 1  # the scan's store: each codec's stored rows written this many times (1: the store itself)
    ray_address: str | None = None  # null: the cluster of `ray job submit`, else a new local one


def _quality(model, tokenizer, reading: ReadingConfig, config: BenchmarkMemoryConfig, store) -> dict:
    paths = {task: os.path.join(config.data_dir, "retrieved", f"{task}-dev.parquet") for task in config.tasks}
    tokenize = TokenizeConfig.as_trained(reading)
    batches = dev_batches(paths, os.path.join(config.data_dir, "tokenizer"), tokenize, 16, config.limit_per_task)
    start = time.perf_counter()
    predictions = predict(model, batches, tokenizer, max_new_tokens=reading.answer_tokens, memory=store)
    seconds = time.perf_counter() - start
    scores = score_predictions(predictions)
    return {
        "em": scores["average"]["em"],
        "em_per_task": {t: scores[t]["em"] for t in config.tasks},
        "reranker_recall_at_m": prediction_recall(predictions),
        "answers": [p["answer"] for p in predictions],
        "seconds": seconds,
    }


def _latency(store_dir: str, ids: list[str], passage_tokens: int, config: BenchmarkMemoryConfig) -> dict:
    rng = np.random.default_rng(0)
    requests = [list(rng.choice(ids, config.latency_passages, replace=False)) for _ in range(config.latency_trials)]
    cold = []
    for request in requests:
        start = time.perf_counter()
        MemoryStore(store_dir, verify="none").fetch(
            request, length=passage_tokens
        )  # fresh object: opens and maps shards
        cold.append(time.perf_counter() - start)
    cache = LRUMemoryCache(MemoryStore(store_dir, verify="none"), config.cache_bytes)
    for request in requests:
        cache.fetch(request, length=passage_tokens)
    cached = []
    for request in requests:
        start = time.perf_counter()
        cache.fetch(request, length=passage_tokens)
        cached.append(time.perf_counter() - start)
    return {
        "cold_ms_p50": 1e3 * float(np.median(cold)),
        "cold_ms_p99": 1e3 * float(np.quantile(cold, 0.99)),
        "cached_ms_p50": 1e3 * float(np.median(cached)),
        "cached_ms_p99": 1e3 * float(np.quantile(cached, 0.99)),
    }


def _scan_store(store: MemoryStore, store_dir: str, copies: int, shard_size: int) -> str:
    """A store of `store`'s rows written `copies` times under distinct ids (`<id>#<copy>`), in shards of
    `shard_size` passages: a scan at a real corpus's size, where a shard's fixed costs no longer dominate."""
    if copies == 1:
        return store_dir
    scan_dir = f"{store_dir}-x{copies}"
    if os.path.exists(os.path.join(scan_dir, MANIFEST)):
        return scan_dir
    os.makedirs(scan_dir, exist_ok=True)
    rows = [(pid, memory) for shard in store.manifest["shards"] for pid, memory in store.read_shard(shard["file"])]
    copied = sorted(
        ((f"{pid}#{copy:04d}", memory) for copy in range(copies) for pid, memory in rows), key=lambda r: r[0]
    )
    shards = []
    for start in range(0, len(copied), shard_size):
        part = copied[start : start + shard_size]
        name = f"shard-v0001-{start // shard_size:05d}"
        shards.append(
            write_shard(store.fs, scan_dir, name, [p for p, _ in part], [m for _, m in part], store.codec, version=1)
        )
    if os.path.exists(os.path.join(store_dir, PQ_CENTROIDS)):
        shutil.copy(os.path.join(store_dir, PQ_CENTROIDS), scan_dir)
    manifest = {
        **store.manifest,
        "shards": shards,
        "num_passages": len(copied),
        "num_tokens": sum(shard["num_tokens"] for shard in shards),
        "bytes": sum(shard["bytes"] for shard in shards),
    }
    with open(os.path.join(scan_dir, MANIFEST), "w") as handle:  # last: a store without it is no store
        json.dump(manifest, handle, indent=2)
    return scan_dir


def _throughput(store_dir: str) -> dict:
    manifest = MemoryStore(store_dir, verify="none").manifest
    files = [os.path.join(store_dir, shard["file"]) for shard in manifest["shards"]]
    stored_bytes = sum(os.path.getsize(f) for f in files)
    repeats = max(1, -(-(256 << 20) // stored_bytes))  # cat >= 256 MiB so its start-up does not count
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # both measurements from the page cache
    start = time.perf_counter()
    subprocess.run(["cat", *(files * repeats)], stdout=subprocess.DEVNULL, check=True)
    cat_seconds = (time.perf_counter() - start) / repeats
    fresh = MemoryStore(store_dir, verify="all")  # the sha256 of every shard: start-up work, not the scan's
    start = time.perf_counter()
    decoded = sum(memory.nbytes for shard in fresh.manifest["shards"] for *_, memory in fresh.scan_shard(shard["file"]))
    read_seconds = time.perf_counter() - start
    return {
        "stored_mb_per_s": stored_bytes / read_seconds / 1e6,
        "decoded_mb_per_s": decoded / read_seconds / 1e6,
        "cat_mb_per_s": stored_bytes / cat_seconds / 1e6,
        "scan_over_cat": cat_seconds / read_seconds,
        "read_seconds": read_seconds,
        "scan_store_bytes": stored_bytes,
        "scan_store_passages": manifest["num_passages"],
    }


def _scan_dir(store: MemoryStore, codec: str, config: BenchmarkMemoryConfig) -> str:
    return _scan_store(store, os.path.join(config.output_dir, codec), config.scan_copies, config.shard_size)


def main(config: BenchmarkMemoryConfig) -> dict:
    if "fp32" not in config.codecs:
        raise SystemExit("codecs must include fp32, the reference the others are measured against")
    if config.scan_copies < 1:
        raise SystemExit(f"scan_copies must be >= 1 (1: scan the store itself); got {config.scan_copies}")
    with ray_session(config.ray_address):
        return _benchmark(config)


def _benchmark(config: BenchmarkMemoryConfig) -> dict:
    # setup
    model = GlimmerForConditionalGeneration.from_pretrained(config.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    reading = load_reading(config.model_dir)  # the token lengths and k it was trained with
    passages = os.path.join(config.data_dir, "passages.parquet")
    results: dict = {"config": to_dict(config), "codecs": {}}

    # builds
    stores = {}
    for codec in config.codecs:
        store_dir = os.path.join(config.output_dir, codec)
        build = build_memory(
            passages,
            store_dir,
            config.model_dir,
            os.path.join(config.data_dir, "tokenizer"),
            reading.passage_tokens,
            codec=codec,
            codec_params={"num_subvectors": config.pq_subvectors},
            shard_size=config.shard_size,
        )
        stores[codec] = MemoryStore(store_dir, verify="all")
        stores[codec].check_model(model, tokenizer)
        results["codecs"][codec] = {
            "build": {
                k: build.get(k)
                for k in (
                    "passages_encoded",
                    "tokens_encoded",
                    "passages_per_second",
                    "tokens_per_second",
                    "wall_seconds",
                )
            }
        }

    # measurements, side by side on the same model and examples
    reference = stores["fp32"]
    ids = reference.passage_ids()
    from_tokens = _quality(model, tokenizer, reading, config, None)
    results["from_tokens"] = {k: v for k, v in from_tokens.items() if k != "answers"}
    for codec, store in stores.items():
        errors_max, errors_sum, values_sum, count = 0.0, 0.0, 0.0, 0
        for pid in ids:
            exact, decoded = reference.get(pid), store.get(pid)
            difference = np.abs(decoded - exact)
            errors_max = max(errors_max, float(difference.max()))
            errors_sum += float(difference.sum())
            values_sum += float(np.abs(exact).sum())
            count += exact.size
        quality = _quality(model, tokenizer, reading, config, store)
        results["codecs"][codec].update(
            {
                "bytes_per_token": store.manifest["bytes_per_token"],
                "compression_vs_fp32": reference.manifest["bytes_per_token"] / store.manifest["bytes_per_token"],
                "store_bytes": store.manifest["bytes"],
                "max_abs_error": errors_max,
                "mean_abs_error": errors_sum / count,
                "mean_relative_error": errors_sum / values_sum,
                "dev_em": quality["em"],
                "dev_em_per_task": quality["em_per_task"],
                "dev_em_change": quality["em"] - from_tokens["em"],
                "answers_changed": sum(a != b for a, b in zip(quality["answers"], from_tokens["answers"]))
                / len(from_tokens["answers"]),
                "reranker_recall_at_m": quality["reranker_recall_at_m"],
                "reranker_recall_change": quality["reranker_recall_at_m"] - from_tokens["reranker_recall_at_m"],
                "latency": _latency(os.path.join(config.output_dir, codec), ids, reading.passage_tokens, config),
                "throughput": _throughput(_scan_dir(store, codec, config)),
            }
        )

    # report
    print(
        f"\nmemory of {len(ids)} passages, {reference.manifest['num_tokens']} tokens, d = {reference.width}; dev: {len(from_tokens['answers'])} examples, "
        f"EM from tokens {from_tokens['em']:.3f}, reranker R@m {from_tokens['reranker_recall_at_m']:.3f}"
    )
    header = [
        "codec",
        "B/token",
        "x fp32",
        "max err",
        "mean rel",
        "dev EM",
        "dEM",
        "changed",
        "dR@m",
        "k=25 cold ms",
        "cached ms",
        "read MB/s",
        "cat MB/s",
        "read/cat",
    ]
    print("".join(f"{h:>13}" for h in header))
    for codec, r in results["codecs"].items():
        print(
            "".join(
                f"{v:>13}"
                for v in [
                    codec,
                    r["bytes_per_token"],
                    f"{r['compression_vs_fp32']:.1f}",
                    f"{r['max_abs_error']:.3g}",
                    f"{r['mean_relative_error']:.2e}",
                    f"{r['dev_em']:.3f}",
                    f"{r['dev_em_change']:+.3f}",
                    f"{r['answers_changed']:.3f}",
                    f"{r['reranker_recall_change']:+.3f}",
                    f"{r['latency']['cold_ms_p50']:.2f}",
                    f"{r['latency']['cached_ms_p50']:.2f}",
                    f"{r['throughput']['stored_mb_per_s']:.0f}",
                    f"{r['throughput']['cat_mb_per_s']:.0f}",
                    f"{r['throughput']['scan_over_cat']:.2f}",
                ]
            )
        )
    print(
        "(changed: share of dev answers that differ from reading the passages' tokens; latencies are medians; "
        "read MB/s: stored bytes decoded per second by MemoryStore.scan_shard, every byte checked by its record batch's crc32, against cat "
        "of the same files from the page cache)"
    )
    results["scan_over_cat"] = results["codecs"]["fp32"]["throughput"]["scan_over_cat"]
    write_report(os.path.join(config.output_dir, "benchmark_memory.json"), results)
    return results


if __name__ == "__main__":
    main(parse_job_args(BenchmarkMemoryConfig, __doc__.splitlines()[0], sys.argv[1:]))
