"""The quality-speed benchmark (jobs/benchmark.py): every setting of one reader on the same dev examples, timed
round-robin, against recall counted by hand from the retrieved files and the ordering of the paper's FLOP formulas."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from glimmer_ray.data import synthkilt
from glimmer_ray.data.reading import ReadingConfig, save_reading
from glimmer_ray.eval.metrics import covers_evidence
from glimmer_ray.eval.variants import VariantConfig
from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.model.random_t5 import save_random_t5, t5_1_1_config
from glimmer_ray.retrieval.index import IndexConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory, load_job):
    """The tiny benchmark with 8 passages retrieved per example, and a random reader saved with its tokenizer."""
    root = tmp_path_factory.mktemp("benchmark_data")
    prepare = load_job("prepare_data")
    prepare.main(
        prepare.PrepareConfig(
            output_dir=str(root),
            scale="tiny",
            num_passages=8,
            recall_ks=[1, 8],
            tokenizer_vocab_size=600,
            index=IndexConfig(use_gpu=False),
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    t5_dir = save_random_t5(
        root / "t5", t5_1_1_config(vocab_size=len(tokenizer), d_model=32, num_layers=4, num_heads=2, dropout_rate=0.0)
    )
    reader = GlimmerForConditionalGeneration.from_t5(t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=4)
    reader.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    save_reading(str(root / "model"), ReadingConfig(24, 48, 4, 8, tuple(synthkilt.TASKS)))  # read as "trained"
    return str(root)


def test_benchmark_runs_every_setting_side_by_side(prepared, tmp_path, load_job):
    benchmark = load_job("benchmark")
    variants = [
        VariantConfig("FiD k=4", 4, None, 1.0, 0.25),
        VariantConfig("LUMEN k=4", 4, None, 0.5, 0.25),
        VariantConfig("GLIMMER k=8 m=4", 8, 4, 0.5, 0.5),
    ]
    config = benchmark.BenchmarkConfig(
        data_dir=prepared,
        model_dir=os.path.join(prepared, "model"),
        variants=variants,
        sweeps=[VariantConfig("GLIMMER k=4 m=4", 4, 4, 0.5, 0.5)],
        limit_per_task=3,
        batch_size=4,
        timing_rounds=2,
        output=str(tmp_path / "out" / "benchmark.json"),
    )
    results = benchmark.main(config)
    assert json.loads((tmp_path / "out" / "benchmark.json").read_text())["variants"][0]["variant"]["name"] == "FiD k=4"
    assert (tmp_path / "out" / "benchmark.png").stat().st_size > 0
    fid, lumen, glimmer = results["variants"]
    (glimmer_all,) = results["sweeps"]
    for result in results["variants"] + results["sweeps"]:
        assert result["examples"] == 3 * len(synthkilt.TASKS)
        assert set(result["em"]) == set(synthkilt.TASKS) | {"average"} and all(
            0.0 <= v <= 1.0 for v in result["em"].values()
        )
        assert len(result["seconds_per_round"]) == 2  # every variant timed in each round
        assert result["seconds_per_example"] == pytest.approx(
            np.median(result["seconds_per_round"]) / result["examples"]
        )
    # FiD reads the retriever's first k: its recall, counted by hand from the retrieved files
    by_hand = []
    for task in synthkilt.TASKS:
        for row in pq.read_table(os.path.join(prepared, "retrieved", f"{task}-dev.parquet")).to_pylist()[:3]:
            by_hand.append(covers_evidence(json.loads(row["provenance"]), row["passage_pages"][:4]))
    assert fid["recall_at_m"] == pytest.approx(sum(by_hand) / len(by_hand))
    assert glimmer_all["recall_at_m"] == fid["recall_at_m"]  # keeping m = k of the same k passages reads them all
    assert fid["layers"] == {"memory": 0, "live_a": 1, "live_b": 3} and glimmer["layers"] == {
        "memory": 2,
        "live_a": 1,
        "live_b": 1,
    }
    # the paper's formulas: memory makes LUMEN cheaper than FiD on the same k; GLIMMER's extra k pays live stage A only
    assert lumen["formula_flops"] < fid["formula_flops"]
    assert glimmer_all["formula_flops"] < glimmer["formula_flops"]

    with pytest.raises(SystemExit, match="timing_rounds must be"):
        benchmark.main(dataclasses.replace(config, timing_rounds=0))
    with pytest.raises(ValueError, match="fewer than k"):
        benchmark.main(dataclasses.replace(config, variants=[VariantConfig("FiD k=9", 9, None, 1.0, 0.25)], sweeps=[]))
