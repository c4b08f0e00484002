"""jobs/dev/read_gold.py: a from-scratch reader trained on gold evidence alone, its dev EM read off the oracle
predictions (scored by hand here against the answers), and bad settings refused."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.ray


def test_read_gold_trains_on_the_evidence_and_scores_the_held_out_questions(quickstart_run, tmp_path, load_job):
    _, _, root = quickstart_run
    job = load_job("dev/read_gold")
    config = job.ReadGoldConfig(
        data_dir=str(root), tasks=["nq", "trex"], d_model=32, num_layers=2, num_heads=2, steps=6, batch_size=4,
        eval_every=3, log_every=2, dev_limit_per_task=3, tie_embeddings=True, output=str(tmp_path / "read.json"),
    )  # fmt: skip
    report = job.main(config)
    assert json.loads((tmp_path / "read.json").read_text()) == report
    assert [point["step"] for point in report["curve"]] == [3, 6]
    for point in report["curve"]:
        assert set(point) >= {"nq", "trex", "average", "loss", "minutes"} and point["loss"] > 0
        assert point["average"] == pytest.approx((point["nq"] + point["trex"]) / 2, abs=1e-4)
    with pytest.raises(SystemExit, match="tasks must be"):
        job.main(job.ReadGoldConfig(data_dir=str(root), tasks=["squad"]))
    with pytest.raises(SystemExit, match="is missing"):
        job.main(job.ReadGoldConfig(data_dir=str(tmp_path / "nowhere")))
