"""The shipped Serve config validates against Ray's own schema and names the builder, its args and every stage;
the app's limits are the model's as trained (reading.json) unless its args set them."""

from __future__ import annotations

import importlib
import pathlib
import subprocess
import sys

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from glimmer_ray.data.reading import ReadingConfig
from glimmer_ray.serving import Limits
from serve_app.app import STAGES, AppArgs, build_app, default_options

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_serve_config_validates_and_matches_the_app():
    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_app" / "config.yaml").read_text()))
    (app,) = config.applications
    module, name = app.import_path.split(":")
    assert getattr(importlib.import_module(module), name) is build_app
    AppArgs.model_validate(app.args)  # unknown or mistyped args would fail here
    assert sorted(d.name for d in app.deployments) == sorted(STAGES)
    for deployment in app.deployments:
        options = deployment.model_dump(exclude_unset=True)
        assert "autoscaling_config" in options and "ray_actor_options" in options
    live = next(d for d in app.deployments if d.name == "LiveEncoderReranker")
    assert (
        live.max_ongoing_requests >= AppArgs.model_validate(app.args).max_batch_size
    )  # DESIGN.md section 5: batches must fill


def test_builder_is_pure_and_serve_build_writes_a_config(tmp_path):
    build_app({})  # no artifact is touched until replicas start
    assert set(default_options(AppArgs())) == set(STAGES)
    serve_cli = pathlib.Path(sys.executable).parent / "serve"  # the console script of this environment
    completed = subprocess.run(
        [str(serve_cli), "build", "serve_app.app:app", "-o", str(tmp_path / "built.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    built = yaml.safe_load((tmp_path / "built.yaml").read_text())
    assert {d["name"] for d in built["applications"][0]["deployments"]} == set(STAGES)


def test_unknown_stage_in_args_is_an_error():
    with pytest.raises(ValueError, match="unknown deployment"):
        build_app({"deployments": {"Reranker": {"num_replicas": 2}}})


def test_unknown_and_as_trained_args_are_errors():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        AppArgs.model_validate({"colour": "red"})
    with pytest.raises(ValidationError, match="question_tokens and tasks are no longer app args.*reading.json"):
        AppArgs.model_validate({"question_tokens": 32, "tasks": ["nq"]})


READING = ReadingConfig(question_tokens=20, passage_tokens=30, answer_tokens=5, num_passages=7, tasks=("tqa", "nq"))


def test_limits_are_the_models_as_trained_unless_set():
    assert AppArgs().limits(READING) == Limits(("tqa", "nq"), "tqa", 20, 7, 25, 5, 32)
    assert AppArgs(default_task="nq", top_k=3, max_new_tokens=9, max_top_k=10).limits(READING, 4) == Limits(
        ("tqa", "nq"), "nq", 20, 3, 4, 9, 32
    )
    with pytest.raises(ValueError, match="default_task 'fever' is not a task the model was trained on \\(tqa, nq\\)"):
        AppArgs(default_task="fever").limits(READING)
