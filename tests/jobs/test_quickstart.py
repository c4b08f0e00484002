"""The quickstart end to end at the tiny scale on a local Ray cluster: every stage runs, the artifacts are laid
out for other tools (KILT gold dev sets and submission-format predictions, metrics.json), questions are answered
over real HTTP (through jobs/serve.py's deploy and ask), and a re-run with the same output directory reuses the
finished stages, as does the build_index job run on its own over that directory."""

from __future__ import annotations

import json

import pytest

from glimmer_ray.data import synthkilt

pytestmark = pytest.mark.ray
FAST_TRAINING = [
    "optim.max_steps=4",
    "checkpoint.every_steps=4",
    "log.every_steps=2",
    "data.dev_limit_per_task=4",
    "scaling.num_workers=1",
    "deepspeed.enabled=false",
    "data.num_passages=4",
    "model.num_selected=2",
    "data.cache=false",
]  # materialising the stream costs more than these 4 steps; tests/train covers it
FAST_PRETRAINING = ["steps=6", "d_model=32", "batch_size=4", "num_cpus=1", "log_every_steps=3"]


def test_quickstart_runs_every_stage_and_reuses_them(ray_cluster, tmp_path, load_job):
    quickstart = load_job("quickstart")
    config = quickstart.QuickstartConfig(
        output_dir=str(tmp_path / "qs"),
        scale="tiny",
        train_overrides=FAST_TRAINING,
        pretrain_overrides=FAST_PRETRAINING,
        questions=2,
        port=8437,
    )
    summary = quickstart.main(config)
    root = tmp_path / "qs"
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
    pretrained = json.loads((root / "t5-pretrained" / "pretrain.json").read_text())  # the reader is fine-tuned from it
    assert pretrained["steps"] == 6 and json.loads((root / "model" / "config.json").read_text())["d_model"] == 32
    answers = summary["stages"]["serve"]["answers"]
    assert len(answers) == 2 and all(len(a["kept"]) == 2 for a in answers)

    model_files = {p.name: p.stat().st_mtime for p in (root / "model").iterdir()}
    config.questions = 0  # no serving this time
    again = quickstart.main(config)
    assert again["stages"]["train"].get("reused") and again["stages"]["evaluate"].get("reused")
    assert again["stages"]["pretrain"]["loss"] == summary["stages"]["pretrain"]["loss"]  # reused, not redone
    assert again["stages"]["memory"]["passages"] == summary["stages"]["memory"]["passages"]
    assert again["stages"]["evaluate"]["em"] == summary["stages"]["evaluate"]["em"]
    assert {p.name: p.stat().st_mtime for p in (root / "model").iterdir()} == model_files

    build_index = load_job("build_index")  # prepare_data ran it; on its own it reuses index/ and retrieved/
    index_files = {p.name: p.stat().st_mtime for p in (root / "index").iterdir()}
    report = build_index.main(build_index.BuildIndexConfig(output_dir=str(root), num_passages=25, recall_ks=[5, 4]))
    assert "index" not in report and "retrieval" not in report
    assert {p.name: p.stat().st_mtime for p in (root / "index").iterdir()} == index_files
    assert report["dev_recall"] == summary["stages"]["data"]["dev_recall"]
    with pytest.raises(SystemExit, match="not a prepared directory"):
        build_index.main(build_index.BuildIndexConfig(output_dir=str(tmp_path / "empty")))
