"""jobs/check_gpu.py as this machine runs it (`device=cpu tiny=true output_dir=DIR`; its device then is the CPU too):
the fp32 figures of the two copies agree exactly, bf16 stays near fp32, the serving path and the training steps are
timed, the inference part has FiD, LUMEN and GLIMMER; a GPU asked for where there is none is a clear error."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from glimmer_ray.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "jobs" / "configs" / "check_gpu.yaml"


def test_check_gpu_compares_devices_and_times_every_part(tmp_path, load_job):
    job = load_job("check_gpu")
    config = load_config(job.CheckGpuConfig, CONFIG, ["device=cpu", "tiny=true", f"output_dir={tmp_path}"])
    report = job.main(config)
    assert json.loads((tmp_path / "check_gpu.json").read_text())["fp32"] == report["fp32"]
    assert report["config"]["d_model"] == 32 and report["config"]["inference"]["model"]["d_model"] == 32  # tiny
    fp32 = report["fp32"]
    assert fp32["loss_cpu"] == fp32["loss_device"] and fp32["greedy_tokens_equal"]
    assert fp32["rerank_head_gradient_max_relative_difference"] == 0.0
    low = report["low_precision"]
    assert low["autocast_loss_relative_difference"] < 0.05 and low["scores_finite"]
    assert list(report["serving_ms_per_example"]) == [
        "memory encoding (k passages)",
        "live encoding + reranking 6 -> 2",
        "greedy generation (3 tokens)",
    ]
    assert all(value > 0 for value in report["serving_ms_per_example"].values())
    seconds = report["step_seconds"]
    assert list(seconds) == ["FiD k=2", "GLIMMER 6->2, no distillation", "GLIMMER 6->2, distillation"]
    assert report["distillation_overhead"] == pytest.approx(seconds[list(seconds)[2]] / seconds[list(seconds)[1]])
    tables = report["inference"]["tables"]
    assert [t["batch_size"] for t in tables] == [1, 2] and report["inference"]["device"] == "cpu"
    for table in tables:
        names = [r["variant"]["name"] for r in table["results"]]
        assert names == ["FiD k=5", "LUMEN k=10", "GLIMMER k=25 m=5"]
        assert all(r["achieved_tflops"] > 0 for r in table["results"])
        assert table["results"][0]["time_ratio_to_baseline"] == 1.0  # FiD is the baseline


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_check_gpu_without_a_gpu_says_so(tmp_path, load_job):
    job = load_job("check_gpu")
    config = load_config(job.CheckGpuConfig, CONFIG, ["device=cuda", "tiny=true", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        job.main(config)
