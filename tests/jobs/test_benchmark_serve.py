"""The serving benchmark (jobs/benchmark_serve.py) on tiny artifacts: closed-loop HTTP clients against the Serve
graph, the in-process pipeline on the same questions, and the graph again without dynamic batching; every
request answered, the ratios computed from the levels they name."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.ray


def test_benchmark_serve_measures_the_graph_against_the_in_process_pipeline(
    ray_cluster, serve_artifacts, tmp_path, load_job
):
    job = load_job("benchmark_serve")
    config = job.BenchmarkServeConfig(
        data_dir=str(serve_artifacts["root"]),
        app=serve_artifacts["args"],
        tasks=["nq"],
        questions=4,
        concurrency=[1, 2],
        requests_per_client=2,
        warmup_requests=1,
        port=8436,
        output=str(tmp_path / "serve.json"),
    )
    results = job.main(config)
    assert json.loads((tmp_path / "serve.json").read_text())["serve"] == results["serve"]
    assert [level["clients"] for level in results["serve"]] == [1, 2]
    for level in results["serve"] + [results["batching"]["max_batch_size_1"]]:
        assert level["failed"] == 0 and level["requests_per_s"] > 0 and level["p50_ms"] <= level["p99_ms"]
    assert results["serve_overhead_p50_ratio"] == pytest.approx(
        results["serve"][0]["p50_ms"] / results["in_process"]["p50_ms"]
    )
    assert results["batching"]["throughput_ratio"] == pytest.approx(
        results["serve"][1]["requests_per_s"] / results["batching"]["max_batch_size_1"]["requests_per_s"]
    )
