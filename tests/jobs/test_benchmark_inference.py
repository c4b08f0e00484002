"""The FiD / LUMEN / GLIMMER inference benchmark (jobs/benchmark_inference.py) at a tiny shape: one table per batch
size with every variant timed, and FLOP ratios that follow the paper's formulas for the settings."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from glimmer_ray.eval.inference import ShapeConfig
from glimmer_ray.eval.variants import VariantConfig


def test_benchmark_inference_tables_follow_the_formulas(tmp_path, load_job):
    job = load_job("benchmark_inference")
    config = job.BenchmarkConfig(
        model=ShapeConfig(vocab_size=128, d_model=32, num_layers=6, num_heads=2, d_ff=64),
        variants=[
            VariantConfig("FiD k=5", 5, None, 1.0, 0.25),
            VariantConfig("LUMEN k=5", 5, None, 1 / 3, 0.25),
            VariantConfig("GLIMMER k=10 m=5", 10, 5, 1 / 3, 0.5),
        ],
        question_tokens=8,
        passage_tokens=16,
        answer_tokens=3,
        batch_sizes=[1, 2],
        num_examples=2,
        tune_allocator=False,
        output=str(tmp_path / "inference.json"),
    )
    report = job.main(config)
    assert json.loads((tmp_path / "inference.json").read_text())["tables"] == report["tables"]
    assert [table["batch_size"] for table in report["tables"]] == [1, 2]
    for table in report["tables"]:
        fid, lumen, glimmer = table["results"]
        assert fid["flops_ratio_to_baseline"] == 1.0 and fid["time_ratio_to_baseline"] == 1.0
        assert lumen["flops_ratio_to_baseline"] < 1.0  # the same k, two thirds of the encoder pre-computed
        assert glimmer["formula_flops"]["total"] > lumen["formula_flops"]["total"]  # 5 more passages through live A
        assert all(len(r["all_seconds_per_example"]) == 2 and r["seconds_per_example"] > 0 for r in table["results"])
        assert all(r["achieved_tflops"] > 0 for r in table["results"])
    # bf16 (the GPU setting) runs the same variants; FLOPs are counted in fp32 on CPU either way
    bf16 = job.main(dataclasses.replace(config, dtype="bfloat16", batch_sizes=[1], output=str(tmp_path / "bf16.json")))
    assert bf16["device"] == "cpu" and bf16["config"]["dtype"] == "bfloat16"
    for ours, theirs in zip(bf16["tables"][0]["results"], report["tables"][0]["results"]):
        assert ours["formula_flops"] == theirs["formula_flops"] and ours["seconds_per_example"] > 0
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            job.main(dataclasses.replace(config, device="cuda"))


def test_benchmark_inference_times_attention_and_chunking_side_by_side(tmp_path, load_job):
    """attention x chunk_tokens: every variant timed under each (eager vs sdpa, one call vs chunks), round-robin,
    each row named by its setting and counted with the same FLOPs; bad settings fail before any model is built."""
    job = load_job("benchmark_inference")
    config = job.BenchmarkConfig(
        model=ShapeConfig(vocab_size=128, d_model=32, num_layers=4, num_heads=2, d_ff=64),
        variants=[VariantConfig("GLIMMER k=6 m=2", 6, 2, 0.5, 0.5)],
        question_tokens=8,
        passage_tokens=16,
        answer_tokens=2,
        batch_sizes=[2],
        num_examples=2,
        attention=["eager", "sdpa"],
        chunk_tokens=[None, 24],  # 24 tokens: one pair per chunk
        tune_allocator=False,
        output=str(tmp_path / "inference.json"),
    )
    (table,) = job.main(config)["tables"]
    rows = table["results"]
    assert [(r["attention"], r["chunk_tokens"]) for r in rows] == [
        ("eager", None), ("eager", 24), ("sdpa", None), ("sdpa", 24)
    ]  # fmt: skip
    assert len({r["name"] for r in rows}) == 4 and rows[0]["time_ratio_to_baseline"] == 1.0
    assert all(r["formula_flops"] == rows[0]["formula_flops"] and r["seconds_per_example"] > 0 for r in rows)
    for bad, message in (({"attention": ["flash"]}, "attention must be"), ({"chunk_tokens": [0]}, "chunk_tokens")):
        with pytest.raises(ValueError, match=message):
            job.main(dataclasses.replace(config, **bad, output=str(tmp_path / "bad.json")))
    assert not (tmp_path / "bad.json").exists()
