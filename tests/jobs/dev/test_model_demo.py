"""jobs/dev/model_demo.py: FiD, LUMEN and GLIMMER built from one random T5.1.1 checkpoint, one Ray task each; the
layer splits follow alpha and beta, only GLIMMER reranks (m of its k passages), and the FLOP ratios follow the
paper's formulas' ordering."""

from __future__ import annotations

import json
import pathlib

import pytest

from glimmer_ray.config import load_config

pytestmark = pytest.mark.ray
ROOT = pathlib.Path(__file__).resolve().parents[3]


def test_model_demo_builds_every_reader_from_one_checkpoint(ray_cluster, tmp_path, load_job):
    job = load_job("dev/model_demo")
    config = load_config(
        job.DemoConfig,
        ROOT / "jobs" / "dev" / "configs" / "model_demo.yaml",
        [f"checkpoint={tmp_path / 't5'}", f"output={tmp_path / 'demo.json'}", "model.d_model=32", "model.d_ff=64"],
    )
    fid, lumen, glimmer = job.main(config)
    assert json.loads((tmp_path / "demo.json").read_text())["results"] == [fid, lumen, glimmer]
    assert fid["layers"] == [0, 0, 6] and lumen["layers"] == [3, 0, 3] and glimmer["layers"] == [3, 1, 2]
    assert fid["rerank_scores"] is None and lumen["rerank_scores"] is None
    assert len(glimmer["rerank_scores"]) == 8 and len(glimmer["selected"]) == 2
    assert all(len(reader["answer_tokens"]) <= config.answer_tokens for reader in (fid, lumen, glimmer))
    # the formulas count every live layer over k pairs: LUMEN's k 4 with half the layers pre-computed costs less than
    # FiD would at k 4 (twice its k 2), GLIMMER's live stage B runs over m = 2 of its 8
    assert fid["formula_flops"]["total"] < lumen["formula_flops"]["total"] < 2 * fid["formula_flops"]["total"]
