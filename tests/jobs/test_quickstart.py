"""The quickstart end to end at the tiny scale on a local Ray cluster: every stage runs, the artifacts are laid
out for other tools (KILT gold dev sets and submission-format predictions, metrics.json), questions are answered
over real HTTP (as jobs/serve.py deploys and asks), and a re-run with the same output directory reuses the
finished stages. The run itself is the session fixture `quickstart_run` (tests/jobs/conftest.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from glimmer_ray.data import synthkilt
from glimmer_ray.data.reading import load_reading

pytestmark = pytest.mark.ray


def test_quickstart_runs_every_stage_and_reuses_them(quickstart_run, load_job):
    config, summary, root = quickstart_run
    for task in synthkilt.TASKS:
        gold = [json.loads(line) for line in (root / "data" / f"{task}-dev-kilt.jsonl").read_text().splitlines()]
        predictions = [
            json.loads(line) for line in (root / "predictions" / f"{task}-dev-kilt.jsonl").read_text().splitlines()
        ]
        assert [p["id"] for p in predictions] == [g["id"] for g in gold]  # every dev example answered, in order
        for prediction in predictions:  # KILT's submission format
            assert set(prediction) == {"id", "output"} and isinstance(prediction["output"][0]["answer"], str)
            assert all("wikipedia_id" in p for p in prediction["output"][0]["provenance"])
    metrics = json.loads((root / "metrics.json").read_text())
    assert set(metrics["models"]["glimmer"]["scores"]) == set(synthkilt.TASKS) | {"average"}
    assert (root / "model" / "config.json").exists() and (root / "memory" / "manifest.json").exists()
    reading = load_reading(str(root / "model"))  # the as-trained settings the later stages read back
    assert (reading.num_passages, reading.tasks) == (4, tuple(synthkilt.TASKS))
    pretrained = json.loads((root / "t5-pretrained" / "pretrain.json").read_text())  # the reader is fine-tuned from it
    assert pretrained["steps"] == 6 and json.loads((root / "model" / "config.json").read_text())["d_model"] == 32
    answers = summary["stages"]["serve"]["answers"]
    assert len(answers) == 2 and all(len(a["kept"]) == 2 for a in answers)

    model_files = {p.name: p.stat().st_mtime for p in (root / "model").iterdir()}
    again = load_job("quickstart").main(dataclasses.replace(config, questions=0))  # no serving this time
    assert again["stages"]["train"].get("reused") and again["stages"]["evaluate"].get("reused")
    assert again["stages"]["pretrain"]["loss"] == summary["stages"]["pretrain"]["loss"]  # reused, not redone
    assert again["stages"]["memory"]["passages"] == summary["stages"]["memory"]["passages"]
    assert again["stages"]["evaluate"]["em"] == summary["stages"]["evaluate"]["em"]
    assert {p.name: p.stat().st_mtime for p in (root / "model").iterdir()} == model_files
