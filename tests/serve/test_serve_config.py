"""The shipped Serve config validates against Ray's own schema, names the builder and sets only what differs from
the app's defaults; the serve job deploys that config's app; the app's limits are the model's as trained."""

from __future__ import annotations

import importlib
import os
import pathlib
import subprocess
import sys

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.exceptions import BackPressureError
from ray.serve.schema import ServeDeploySchema

from glimmer_ray.config import load_config
from glimmer_ray.data.reading import ReadingConfig
from glimmer_ray.memory.store import MemoryStoreError
from glimmer_ray.serving import MAX_BATCH_REQUESTS, BatchRequest, Limits
from serve_app.app import (
    ARTIFACTS_ENV,
    FUSED_STAGES,
    STAGES,
    AppArgs,
    StageTimeout,
    build_app,
    default_options,
    failure_response,
    replica_died,
    stage_health,
    stage_options,
)
from serve_app.deploy import config_args, config_http_options

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "serve_app" / "config.yaml"
ARTIFACTS = {"model_dir", "index_dir", "passages", "memory_store"}  # what a user must set: where the artifacts are


def test_serve_config_validates_and_matches_the_app():
    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (app,) = config.applications
    module, name = app.import_path.split(":")
    assert getattr(importlib.import_module(module), name) is build_app
    AppArgs.model_validate(app.args)  # unknown or mistyped args fail here
    assert {d.name for d in app.deployments} <= set(STAGES)
    args = AppArgs.model_validate(config_args(str(CONFIG), app.name))
    for stage in ("LiveEncoderReranker", "Decoder"):  # DESIGN.md section 6: batches must fill
        assert stage_options(args)[stage]["max_ongoing_requests"] >= args.max_batch_size


def test_serve_config_sets_only_what_differs_from_the_defaults():
    (app,) = yaml.safe_load(CONFIG.read_text())["applications"]
    defaults = AppArgs().model_dump()
    restated = {key for key, value in app["args"].items() if key not in ARTIFACTS and value == defaults[key]}
    assert not restated, f"serve_app/config.yaml restates AppArgs defaults: {sorted(restated)}"
    stage_defaults = default_options(AppArgs.model_validate(app["args"]))
    for deployment in app.get("deployments", []):
        same = {k for k, v in deployment.items() if k != "name" and stage_defaults[deployment["name"]].get(k) == v}
        assert not same, f"serve_app/config.yaml restates {deployment['name']}'s default options {sorted(same)}"


def test_the_serve_job_deploys_the_serve_configs_app(load_job):
    serve_job = load_job("serve")
    config = load_config(serve_job.ServeConfig, ROOT / "jobs" / "configs" / "serve.yaml")
    assert (ROOT / config.serve_config).resolve() == CONFIG
    config.serve_config = str(CONFIG)
    assert config.args() == {**config_args(str(CONFIG)), **config.app}
    config.app = {"model_dir": "elsewhere/model", "top_k": 3}
    assert config.args() == {**config_args(str(CONFIG)), "model_dir": "elsewhere/model", "top_k": 3}
    config.validate()


def test_config_args_sets_the_deployments_list_over_args(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "applications": [
                    {
                        "name": "glimmer",
                        "import_path": "serve_app.app:build_app",
                        "args": {
                            "top_k": 3,
                            "deployments": {"Decoder": {"max_ongoing_requests": 4, "num_replicas": 2}},
                        },
                        "deployments": [{"name": "Decoder", "num_replicas": 3}, {"name": "Ingress", "num_replicas": 1}],
                    }
                ]
            }
        )
    )
    assert config_args(str(path)) == {
        "top_k": 3,
        "deployments": {"Decoder": {"max_ongoing_requests": 4, "num_replicas": 3}, "Ingress": {"num_replicas": 1}},
    }
    with pytest.raises(ValueError, match="no application named 'other'; it has glimmer"):
        config_args(str(path), "other")


def test_builder_is_pure_and_serve_build_writes_a_config(tmp_path):
    build_app({})  # no artifact is touched until replicas start
    assert set(default_options(AppArgs())) == set(STAGES) | set(FUSED_STAGES)
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


def test_the_fused_app_is_the_ingress_alone():
    args = AppArgs(fused_stages=True, deployments={"Ingress": {"num_replicas": 2}}).resolved()
    options = stage_options(args)
    assert set(options) == set(FUSED_STAGES) == {"Ingress"} and options["Ingress"]["num_replicas"] == 2
    assert "autoscaling_config" not in options["Ingress"]
    fused = stage_options(AppArgs(fused_stages=True).resolved())["Ingress"]  # it runs the reader: a model stage's CPUs
    assert fused["ray_actor_options"]["num_cpus"] == 0.5 and fused["autoscaling_config"]["target_ongoing_requests"] == 8
    build_app({"fused_stages": True})  # pure: no artifact touched
    # one batching point instead of three: a shorter wait by default, as set when given
    assert args.batch_wait_timeout_s == 0.001 and AppArgs().resolved().batch_wait_timeout_s == 0.005
    assert AppArgs(fused_stages=True, batch_wait_timeout_s=0.01).resolved().batch_wait_timeout_s == 0.01
    with pytest.raises(ValueError, match=r"unknown deployment\(s\) Reader.*fused_stages: true"):
        AppArgs(fused_stages=True, deployments={"Reader": {"num_replicas": 2}}).resolved()
    with pytest.raises(ValueError, match="Ingress reserve none"):
        stage_options(AppArgs(fused_stages=True, device="cuda").resolved())


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


class _StageError(Exception):
    """How Ray hands a stage's exception to its caller: a traceback in the message, the original as `cause`."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f'Traceback (most recent call last):\n  File "/srv/app/serving.py", line 1\n{cause}')
        self.cause = cause


def test_stage_failures_are_one_line_and_say_whether_to_retry():
    corrupt = _StageError(MemoryStoreError("shard shard-00001.arrow of /data/store fails its sha256 check"))
    status, body, headers = failure_response(corrupt)
    assert status == 500 and not headers  # permanent: no Retry-After
    assert "rebuild it" in body["error"] and "/data" not in body["error"] and "\n" not in body["error"]
    status, body, headers = failure_response(_StageError(ZeroDivisionError("division by zero at /srv/app")))
    assert (status, body) == (500, {"error": "a serving stage failed: ZeroDivisionError"})
    status, body, headers = failure_response(
        _StageError(BackPressureError(num_queued_requests=9, max_queued_requests=8))
    )
    assert status == 503 and headers == {"Retry-After": "1"} and "retry" in body["error"]
    status, body, headers = failure_response(StageTimeout("Decoder", 20.0))  # past a stage's deadline
    assert (status, headers) == (503, {"Retry-After": "1"}) and body[
        "error"
    ] == "Decoder did not answer within 20 s; retry"


def test_a_replica_death_is_recognised_however_serve_wraps_it():
    import ray
    from ray.serve.exceptions import RayServeException

    died = ray.exceptions.ActorDiedError()
    assert replica_died(died)
    assert replica_died(_StageError(died))  # a RayTaskError's cause: the chain's argument failed
    upstream = RayServeException("an upstream actor died before finishing a dependent task")
    upstream.__cause__ = died
    assert replica_died(upstream)
    assert not replica_died(_StageError(ZeroDivisionError("division by zero")))  # a stage's own bug: no retry
    assert not replica_died(StageTimeout("Decoder", 20.0))
    assert not replica_died(_StageError(BackPressureError(num_queued_requests=9, max_queued_requests=8)))


def test_a_batch_has_a_documented_maximum():
    one = {"question": "capital"}
    assert len(BatchRequest(requests=[one] * MAX_BATCH_REQUESTS).requests) == MAX_BATCH_REQUESTS
    with pytest.raises(ValidationError, match=f"at most {MAX_BATCH_REQUESTS} items"):
        BatchRequest(requests=[one] * (MAX_BATCH_REQUESTS + 1))


def test_stage_health_reads_serve_status():
    from types import SimpleNamespace

    def deployment(status: str, running: int) -> SimpleNamespace:
        return SimpleNamespace(status=status, replica_states={"RUNNING": running} if running else {})

    assert stage_health(deployment("HEALTHY", 2)) == "ready"
    assert stage_health(deployment("UPDATING", 1)) == "degraded"  # a replica is being replaced: still serving
    assert stage_health(deployment("UNHEALTHY", 0)) == "down"
    assert stage_health(None) == "down"  # not deployed


def test_artifacts_come_from_one_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(ARTIFACTS_ENV, raising=False)
    args = AppArgs(artifacts_dir=str(tmp_path)).resolved()
    assert (args.model_dir, args.index_dir) == (str(tmp_path / "model"), str(tmp_path / "index"))
    assert (args.passages, args.memory_store) == (str(tmp_path / "passages.parquet"), str(tmp_path / "memory"))
    args = AppArgs(artifacts_dir=str(tmp_path), index_dir="elsewhere/index").resolved()  # a path given stays
    assert args.index_dir == os.path.abspath("elsewhere/index") and args.model_dir == str(tmp_path / "model")
    # serve run serve_app/config.yaml after `jobs/quickstart.py --output-dir DIR`: the environment names DIR
    monkeypatch.setenv(ARTIFACTS_ENV, str(tmp_path / "run"))
    args = AppArgs.model_validate(config_args(str(CONFIG))).resolved()
    assert args.model_dir == str(tmp_path / "run" / "model") and args.memory_store == str(tmp_path / "run" / "memory")
    monkeypatch.delenv(ARTIFACTS_ENV)
    assert AppArgs().resolved().model_dir == os.path.abspath("outputs/quickstart/model")  # the quickstart's
    assert AppArgs(artifacts_dir="s3://bucket/run").resolved().memory_store == "s3://bucket/run/memory"


def test_the_proxy_timeout_never_cuts_what_the_stage_deadlines_would_answer():
    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (app,) = config.applications
    args = AppArgs.model_validate(config_args(str(CONFIG), app.name))
    timeout = config_http_options(str(CONFIG))["request_timeout_s"]
    assert config.http_options.request_timeout_s == timeout
    assert timeout > (len(STAGES) - 1) * args.stage_timeout_s  # the four stages behind the Ingress, one after another
