"""jobs/dev/unseen_gold.py: the share of dev questions whose gold evidence no training question had, counted by
hand from the retrieved files; on the training split it is 0 by construction."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from glimmer_ray.data import synthkilt

pytestmark = pytest.mark.ray


def test_unseen_gold_counts_dev_evidence_never_gold_in_training(quickstart_run, tmp_path, load_job):
    _, _, root = quickstart_run
    job = load_job("dev/unseen_gold")
    config = job.UnseenGoldConfig(data_dir=str(root), limit_per_task=5, output=str(tmp_path / "unseen.json"))
    shares = job.main(config)
    assert json.loads((tmp_path / "unseen.json").read_text()) == shares
    trained = {
        passage
        for task in synthkilt.TASKS
        for ids in pq.read_table(root / "retrieved" / f"{task}-train.parquet", columns=["gold_ids"])[
            "gold_ids"
        ].to_pylist()
        for passage in ids
    }
    rows = pq.read_table(root / "retrieved" / "nq-dev.parquet", columns=["gold_ids"]).to_pylist()[:5]
    assert shares["nq"]["passage"] == sum(not set(r["gold_ids"]) & trained for r in rows) / 5
    on_train = job.main(job.UnseenGoldConfig(data_dir=str(root), split="train", output=str(tmp_path / "train.json")))
    assert all(share == {"passage": 0.0, "page": 0.0} for share in on_train.values())
    with pytest.raises(SystemExit, match="split must be"):
        job.main(job.UnseenGoldConfig(data_dir=str(root), split="test"))
    with pytest.raises(SystemExit, match="must be jobs/prepare_data.py outputs"):
        job.main(job.UnseenGoldConfig(data_dir=str(root), train_dirs=[str(tmp_path)], output=str(tmp_path / "x.json")))
