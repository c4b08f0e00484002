"""The memory-codec benchmark (jobs/benchmark_memory.py) on the quickstart's reader: reading fp32 memory answers
exactly as reading the passages' tokens, the bytes a token follow the codecs' definitions, and a config without
the fp32 reference is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from glimmer_ray.memory.store import MemoryStore
from glimmer_ray.model.configuration import GlimmerConfig

pytestmark = pytest.mark.ray


def test_benchmark_memory_measures_every_codec_against_fp32(quickstart_run, tmp_path, load_job):
    _, _, root = quickstart_run
    job = load_job("benchmark_memory")
    config = job.BenchmarkMemoryConfig(
        data_dir=str(root),
        model_dir=str(root / "model"),
        output_dir=str(tmp_path / "bench"),
        codecs=["fp32", "int8"],
        limit_per_task=3,
        latency_passages=4,
        latency_trials=3,
    )
    results = job.main(config)
    assert json.loads((tmp_path / "bench" / "benchmark_memory.json").read_text()) == results
    d = GlimmerConfig.from_pretrained(root / "model").d_model
    fp32, int8 = results["codecs"]["fp32"], results["codecs"]["int8"]
    assert fp32["bytes_per_token"] == 4 * d and int8["bytes_per_token"] == d + 4  # one float32 scale a token
    assert fp32["max_abs_error"] == 0 and fp32["answers_changed"] == 0 and fp32["dev_em_change"] == 0
    assert 0 < int8["max_abs_error"] and int8["compression_vs_fp32"] == pytest.approx(4 * d / (d + 4))
    assert results["scan_over_cat"] == fp32["throughput"]["scan_over_cat"] > 0  # the bulk scan against cat
    assert fp32["throughput"]["scan_store_bytes"] == fp32["store_bytes"]
    scaled = job.main(job.BenchmarkMemoryConfig(**{**vars(config), "codecs": ["fp32"], "scan_copies": 3}))
    store = MemoryStore(str(tmp_path / "bench" / "fp32"))
    copies = MemoryStore(str(tmp_path / "bench" / "fp32-x3"), verify="all")  # a store as any other: sha256s hold
    assert (
        scaled["codecs"]["fp32"]["throughput"]["scan_store_passages"] == copies.num_passages == 3 * store.num_passages
    )
    first = store.passage_ids()[0]
    assert np.array_equal(copies.get(f"{first}#0002"), store.get(first))
    with pytest.raises(SystemExit, match="must include fp32"):
        job.main(job.BenchmarkMemoryConfig(codecs=["int8"]))
    with pytest.raises(SystemExit, match="scan_copies must be >= 1"):
        job.main(job.BenchmarkMemoryConfig(scan_copies=0))
