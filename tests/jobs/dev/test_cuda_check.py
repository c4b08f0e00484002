"""jobs/dev/cuda_check.py at a tiny shape on this machine's CPU (its device then is the CPU too): the fp32 figures of
the two copies agree exactly, bf16 autocast stays near fp32, and the step times give the distillation overhead."""

from __future__ import annotations

import json
import pathlib

import pytest

from glimmer_ray.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[3]


def test_cuda_check_compares_devices_and_times_the_steps(tmp_path, load_job):
    job = load_job("dev/cuda_check")
    tiny = ["d_model=32", "num_layers=2", "num_heads=2", "vocab_size=300", "batch_size=2", "num_passages=6"]
    tiny += ["num_selected=2", "question_tokens=6", "passage_tokens=12", "answer_tokens=3", "timing_steps=2"]
    config = load_config(
        job.CudaCheckConfig,
        ROOT / "jobs" / "dev" / "configs" / "cuda_check.yaml",
        [*tiny, "device=cpu", f"output={tmp_path / 'check.json'}"],
    )
    report = job.main(config)
    assert json.loads((tmp_path / "check.json").read_text())["fp32"] == report["fp32"]
    fp32 = report["fp32"]
    assert fp32["loss_cpu"] == fp32["loss_device"] and fp32["greedy_tokens_equal"]
    assert fp32["rerank_head_gradient_max_relative_difference"] == 0.0
    assert report["bf16"]["autocast_loss_relative_difference"] < 0.05 and report["bf16"]["bf16_scores_finite"]
    seconds = report["step_seconds"]
    assert list(seconds) == ["FiD k=2", "GLIMMER 6->2, no distillation", "GLIMMER 6->2, distillation"]
    assert report["distillation_overhead"] == pytest.approx(seconds[list(seconds)[2]] / seconds[list(seconds)[1]])
