"""The shipped Serve config validates against Ray's own schema and names the builder, its args and every stage."""

from __future__ import annotations

import importlib
import pathlib
import subprocess
import sys

import yaml
from ray.serve.schema import ServeDeploySchema

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
    import pytest

    with pytest.raises(ValueError, match="unknown deployment"):
        build_app({"deployments": {"Reranker": {"num_replicas": 2}}})
