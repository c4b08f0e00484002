"""The evaluate job on the tiny quickstart's reader and data: KILT-format predictions and scores per task for the
reader, the same weights read closed-book and the oracle that reads the gold evidence alone; recall@m of the
reranker, the retriever and the distillation teacher at page and passage level, counted by hand where it can be;
every model read as it was trained (its reading.json)."""

from __future__ import annotations

import dataclasses
import json
import os

import pyarrow.parquet as pq
import pytest

from glimmer_ray.data.reading import load_reading
from glimmer_ray.eval.run import EvaluateConfig, ModelEntry

pytestmark = pytest.mark.ray


def test_evaluate_job_writes_kilt_predictions_and_scores(quickstart_run, tmp_path, load_job):
    _, _, root = quickstart_run
    data_dir, model_dir = str(root), str(root / "model")
    evaluate = load_job("evaluate")
    config = EvaluateConfig(
        models=[
            ModelEntry("glimmer", model_dir),
            ModelEntry("closed", model_dir, closed_book=True),
            ModelEntry("oracle", model_dir, reads="gold"),
        ],
        data_dir=data_dir,
        limit_per_task=5,
        output_dir=str(tmp_path / "eval"),
    )
    results = evaluate.main(config)
    reading = load_reading(model_dir)
    assert (
        results["models"]["glimmer"]["num_selected"] == 2 and reading.num_passages == 4
    )  # k as trained, m the model's
    for name in ("glimmer", "closed"):
        scores = results["models"][name]["scores"]
        assert set(scores) == {"nq", "tqa", "hotpotqa", "fever", "zsre", "trex", "average"}
        assert scores["nq"]["count"] == 5 and 0.0 <= scores["average"]["em"] <= 1.0
        lines = (tmp_path / "eval" / "predictions" / name / "nq-dev-kilt.jsonl").read_text().splitlines()
        record = json.loads(lines[0])
        assert len(lines) == 5 and set(record) == {"id", "output"} and "answer" in record["output"][0]
    assert results["models"]["closed"]["reranker_recall_at_m"] is None
    assert 0.0 <= results["models"]["glimmer"]["reranker_recall_at_m"] <= 1.0
    # per task: the retriever's own first m against nq's single gold page, the reranker's mean over tasks
    glimmer = results["models"]["glimmer"]
    by_task, m = glimmer["recall_at_m_by_task"], glimmer["num_selected"]
    rows = pq.read_table(os.path.join(data_dir, "retrieved", "nq-dev.parquet")).to_pylist()[:5]
    assert (
        by_task["nq"]["retriever"] == sum(json.loads(r["provenance"])[0][0] in r["passage_pages"][:m] for r in rows) / 5
    )
    assert sum(t["reranker"] for t in by_task.values()) / 6 == pytest.approx(glimmer["reranker_recall_at_m"])
    assert all(0.0 <= t["teacher"] <= 1.0 for t in by_task.values())  # the distillation teacher's own top m
    assert results["models"]["closed"]["recall_at_m_by_task"]["nq"]["reranker"] is None
    # passage level: the retriever's first passage against the passages holding nq's gold paragraph; never above page level
    passages = glimmer["passage_recall_by_task"]
    assert (
        passages["nq"]["1"]["retriever"]
        == sum(r["passage_ids"][0] in json.loads(r["gold_passages"])[0][0] for r in rows) / 5
    )
    for task, at in passages.items():
        assert (
            at[str(m)]["reranker"] <= by_task[task]["reranker"]
            and at[str(m)]["retriever"] <= by_task[task]["retriever"]
        )
        assert (
            at["1"]["reranker"] <= at[str(m)]["reranker"] and 0.0 <= at["1"]["teacher"] <= at[str(m)]["teacher"] <= 1.0
        )
    assert results["models"]["closed"]["passage_recall_by_task"]["nq"]["1"]["reranker"] is None
    # the oracle reads the g = 2 gold evidence passages alone: its predictions name their pages first, no recall is claimed
    oracle = results["models"]["oracle"]
    assert (
        oracle["num_selected"] == 2 and oracle["reranker_recall_at_m"] is None and oracle["scores"]["nq"]["count"] == 5
    )
    assert (
        oracle["passage_recall_by_task"]["nq"]["1"]["reranker"] is None
        and oracle["recall_at_m_by_task"]["nq"]["teacher"] is None
    )
    assert all(0.0 <= oracle["scores"][task]["em"] <= 1.0 for task in oracle["scores"])
    assert oracle["scores"]["nq"]["rprec"] == 1.0  # nq's one gold page is the page of the passages read
    with pytest.raises(SystemExit, match="reads must be"):
        evaluate.main(dataclasses.replace(config, models=[ModelEntry("x", model_dir, reads="oracle")]))
    # the training split: predictions are named by the split
    # (with the teacher's pass turned off for this model alone: an entry's teacher_recall overrides the evaluation's)
    no_teacher = [dataclasses.replace(config.models[0], teacher_recall=False)]
    on_train = evaluate.main(dataclasses.replace(config, models=no_teacher, split="train"))
    assert on_train["models"]["glimmer"]["scores"]["nq"]["count"] == 5
    assert on_train["models"]["glimmer"]["recall_at_m_by_task"]["nq"]["teacher"] is None
    assert len((tmp_path / "eval" / "predictions" / "glimmer" / "nq-train-kilt.jsonl").read_text().splitlines()) == 5
    with pytest.raises(SystemExit, match="split must be"):
        evaluate.main(dataclasses.replace(config, split="test"))
    assert (tmp_path / "eval" / "metrics.json").exists()
