"""The ZeRO-3 memory benchmark runs the training job's set-up on real Ray Train workers with real DeepSpeed, both
constructions, and writes the per-worker table and the top-level ratios; bad settings are refused before any run."""

from __future__ import annotations

import json
import math
import os

import pytest

pytestmark = pytest.mark.ray


def _tiny(benchmark, tmp_path, **settings):
    tiny = dict(
        model=benchmark.ZeroModel(d_model=32, num_layers=2, num_heads=2, d_ff=64, vocab_size=128),
        world_sizes=[2],
        steps=2,
        max_shard_size="20KB",
        output_dir=str(tmp_path),
    )
    return benchmark.BenchmarkZeroConfig(**{**tiny, **settings})


def test_both_constructions_on_two_workers_write_the_table(load_job, tmp_path, ray_cluster):
    benchmark = load_job("benchmark_zero")
    report = benchmark.main(_tiny(benchmark, tmp_path))
    written = json.loads((tmp_path / "benchmark_zero.json").read_text())
    assert written["peak_rss_over_fp32"] == pytest.approx(report["peak_rss_over_fp32"]) and written["world_size"] == 2
    assert len(os.listdir(tmp_path / "t5-checkpoint")) > 4  # saved sharded, as HF writes large models
    assert [row["construction"] for row in written["rows"]] == ["partitioned", "replicated"]
    fp32 = written["fp32_gib"]
    assert fp32 == pytest.approx(4 * written["parameters"] / 2**30)
    for row in written["rows"]:
        assert [worker["rank"] for worker in row["workers"]] == [0, 1]
        for worker in row["workers"]:
            assert (
                0
                < worker["before_gib"]
                <= min(worker["build_peak_gib"], worker["initialize_peak_gib"], worker["step_peak_gib"])
            )
            assert worker["build_peak_over_fp32"] == pytest.approx(worker["build_peak_gib"] / fp32)
            parts = [worker[f"{part}_peak_gib"] for part in ("forward", "backward", "optimizer")]
            assert worker["step_peak_gib"] == max(parts) and min(parts) >= worker["before_gib"]
            assert len(worker["losses"]) == 2 and all(math.isfinite(loss) for loss in worker["losses"])
            states, live = 16 * written["parameters"] / 2, 4 * written["parameters"]  # Adafactor: 4 + 4 + 4 + 4 bytes
            expected = worker["before_gib"] + (states + live) / 2**30  # a tiny model stays whole while live
            assert worker["predicted_gib"] == pytest.approx(expected)
    partitioned = written["rows"][0]["workers"]
    assert written["step_peak_rss_over_fp32"] == pytest.approx(max(w["step_peak_over_fp32"] for w in partitioned))

    again = benchmark.main(_tiny(benchmark, tmp_path, constructions=["partitioned"]))  # the checkpoint is reused
    assert [row["construction"] for row in again["rows"]] == ["partitioned"]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"constructions": ["partitioned", "lazy"]}, "constructions must be"),
        ({"world_sizes": [0]}, "world_sizes must be"),
        ({"optimizer": "sgd"}, "optimizer must be"),
        ({"num_selected": 9}, "num_selected <= num_passages"),
    ],
)
def test_bad_settings_are_refused_before_any_run(load_job, tmp_path, settings, message):
    benchmark = load_job("benchmark_zero")
    with pytest.raises(SystemExit, match=message):
        benchmark.main(_tiny(benchmark, tmp_path / "out", **settings))
    assert not (tmp_path / "out").exists()
