"""Serving benchmark: closed-loop HTTP load on the Serve graph against the in-process pipeline, with and without batching.

    python jobs/benchmark_serve.py --config jobs/configs/benchmark_serve.yaml
    ray job submit --working-dir . -- python jobs/benchmark_serve.py --config jobs/configs/benchmark_serve.yaml

The app is started on this cluster; for every concurrency level that many clients each send requests
back to back (closed loop) for `requests_per_client` requests: p50/p99 latency, requests/s and the
mean time of each stage. The same dev questions then run through `InProcessPipeline` one at a time, so
the Serve graph's overhead is a ratio measured in the same run. With `fused`, the app is redeployed with
`fused_stages: true` (the four stages inside the Ingress: no hop after the HTTP proxy) and every level repeated.
Finally the app is redeployed with `max_batch_size: 1` and the highest concurrency repeated: the effect of dynamic
batching.
"""

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import requests
from ray import serve

from glimmer_ray.cli import ray_session
from glimmer_ray.config import parse_job_args, to_dict
from glimmer_ray.data.reading import load_reading
from glimmer_ray.serving import InProcessPipeline, QuestionTokenizer, RequestError
from serve_app.app import AppArgs
from serve_app.deploy import deploy


@dataclass
class BenchmarkServeConfig:
    data_dir: str = "outputs/quickstart"  # retrieved dev questions come from <data_dir>/retrieved
    app: dict = field(
        default_factory=lambda: {
            "model_dir": "outputs/quickstart/model",
            "index_dir": "outputs/quickstart/index",
            "passages": "outputs/quickstart/passages.parquet",
            "memory_store": "outputs/quickstart/memory",
        }
    )  # AppArgs
    tasks: list[str] = field(default_factory=lambda: ["nq", "tqa", "hotpotqa", "zsre"])  # dev questions of these tasks
    questions: int = 64  # distinct dev questions
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # closed-loop clients
    requests_per_client: int = 8  # requests each client sends per level
    warmup_requests: int = 8  # untimed requests after start-up
    port: int = 8000  # HTTP port of the Serve proxy
    fused: bool = True  # also load the fused app (fused_stages: the four stages inside the Ingress) at each level
    output: str = "outputs/quickstart/benchmark_serve.json"
    ray_address: str | None = None  # null: the cluster of `ray job submit`, else a new local one


def _questions(config: BenchmarkServeConfig) -> list[dict]:
    rows = []
    for task in config.tasks:
        table = pq.read_table(
            os.path.join(config.data_dir, "retrieved", f"{task}-dev.parquet"), columns=["input"]
        ).to_pylist()
        rows.extend({"question": row["input"], "task": task} for row in table)
    args = AppArgs.model_validate(config.app).resolved()
    tokenizer = QuestionTokenizer(args.model_dir, load_reading(args.model_dir).question_tokens)
    fits = []
    for row in rows:  # questions over the app's token limit would get a 400, not an answer
        try:
            tokenizer(row["task"], row["question"])
            fits.append(row)
        except RequestError:
            pass
    rng = np.random.default_rng(0)
    return [fits[i] for i in rng.permutation(len(fits))[: config.questions]]


def _closed_loop(url: str, questions: list[dict], clients: int, per_client: int) -> dict:
    latencies: list[float] = []
    stages: dict[str, list[float]] = {}
    failures = [0]
    lock = threading.Lock()

    def client(index: int) -> None:
        session = requests.Session()
        for n in range(per_client):
            body = questions[(index * per_client + n) % len(questions)]
            start = time.perf_counter()
            response = session.post(f"{url}/v1/answer", json=body, timeout=300)
            elapsed = 1e3 * (time.perf_counter() - start)
            with lock:
                if response.status_code != 200:
                    failures[0] += 1
                    continue
                latencies.append(elapsed)
                for stage, value in response.json()["timings"].items():
                    stages.setdefault(stage, []).append(value)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(latencies),
        "failed": failures[0],
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "requests_per_s": len(latencies) / wall,
        "stage_ms": {stage: float(np.mean(values)) for stage, values in stages.items()},
    }


def main(config: BenchmarkServeConfig) -> dict:
    # setup
    with ray_session(config.ray_address):
        questions = _questions(config)
        results: dict = {"config": to_dict(config), "serve": [], "batching": {}}

        # the Serve graph under closed-loop load
        url = deploy(config.app, port=config.port)
        _closed_loop(url, questions, 1, config.warmup_requests)
        for clients in config.concurrency:
            level = _closed_loop(url, questions, clients, config.requests_per_client)
            results["serve"].append(level)
            print(
                f"[serve] {clients:>2} clients: p50 {level['p50_ms']:.1f} ms, p99 {level['p99_ms']:.1f} ms, {level['requests_per_s']:.2f} req/s, "
                f"{level['failed']} failed",
                flush=True,
            )

        # the same questions in process, one at a time
        args = AppArgs.model_validate(config.app).resolved()
        pipeline = InProcessPipeline(
            args.model_dir,
            args.index_dir,
            args.passages,
            args.memory_store,
            args.limits(load_reading(args.model_dir)),
            args.encoder_path,
            args.cache_bytes,
        )
        for question in questions[: config.warmup_requests]:
            pipeline.answer(question)
        latencies, stages = [], {}
        start = time.perf_counter()
        for question in questions[: config.requests_per_client * 2]:
            begin = time.perf_counter()
            timings = pipeline.answer(question).timings
            latencies.append(1e3 * (time.perf_counter() - begin))
            for stage, value in timings.items():
                stages.setdefault(stage, []).append(value)
        results["in_process"] = {
            "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)),
            "requests_per_s": len(latencies) / (time.perf_counter() - start),
            "stage_ms": {stage: float(np.mean(v)) for stage, v in stages.items()},
        }
        del pipeline
        one_client = results["serve"][0]
        results["serve_overhead_p50_ratio"] = one_client["p50_ms"] / results["in_process"]["p50_ms"]

        # the fused app: the four stages inside the Ingress, no hop after the HTTP proxy (fused_stages: true)
        if config.fused:
            url = deploy({**config.app, "fused_stages": True}, port=config.port)
            _closed_loop(url, questions, 1, config.warmup_requests)
            results["fused"] = []
            for clients in config.concurrency:
                level = _closed_loop(url, questions, clients, config.requests_per_client)
                results["fused"].append(level)
                print(
                    f"[fused] {clients:>2} clients: p50 {level['p50_ms']:.1f} ms, {level['failed']} failed", flush=True
                )
            results["fused_overhead_p50_ratio"] = results["fused"][0]["p50_ms"] / results["in_process"]["p50_ms"]

        # dynamic batching on and off at the highest concurrency
        top = max(config.concurrency)
        results["batching"]["max_batch_size_default"] = next(
            level for level in results["serve"] if level["clients"] == top
        )
        url = deploy({**config.app, "max_batch_size": 1}, port=config.port)
        _closed_loop(url, questions, 1, config.warmup_requests)
        results["batching"]["max_batch_size_1"] = _closed_loop(url, questions, top, config.requests_per_client)
        results["batching"]["throughput_ratio"] = (
            results["batching"]["max_batch_size_default"]["requests_per_s"]
            / results["batching"]["max_batch_size_1"]["requests_per_s"]
        )

        # report
        stage_names = ["retriever", "memory", "live", "decoder"]
        print(
            f"\n{'setting':<22}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}"
            + "".join(f"{s + ' ms':>13}" for s in stage_names)
        )
        rows = [(f"serve, {level['clients']} clients", level) for level in results["serve"]]
        rows += [(f"fused, {level['clients']} clients", level) for level in results.get("fused", [])]
        rows += [
            ("in-process, 1 at a time", results["in_process"]),
            (f"serve, {top} cl., batch 1", results["batching"]["max_batch_size_1"]),
        ]
        for label, row in rows:
            print(
                f"{label:<22}{row['p50_ms']:9.1f}{row['p99_ms']:9.1f}{row['requests_per_s']:8.2f}"
                + "".join(f"{row['stage_ms'].get(s, float('nan')):13.1f}" for s in stage_names)
            )
        if config.fused:
            print(f"fused app / in-process p50 latency at 1 client: {results['fused_overhead_p50_ratio']:.2f}x")
        print(
            f"Serve graph / in-process p50 latency at 1 client: {results['serve_overhead_p50_ratio']:.2f}x; "
            f"dynamic batching (max_batch_size {AppArgs.model_validate(config.app).max_batch_size} vs 1) at {top} clients: "
            f"{results['batching']['throughput_ratio']:.2f}x requests/s"
        )
        os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
        with open(config.output, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"wrote {config.output}")

        # cleanup
        serve.shutdown()
    return results


if __name__ == "__main__":
    main(parse_job_args(BenchmarkServeConfig, __doc__.splitlines()[0], sys.argv[1:]))
