"""Cluster configs: the launcher YAMLs against Ray's cluster-config schema, the KubeRay manifests' structure, and
the RayService's Serve config against serve_app/config.yaml."""

from __future__ import annotations

import pathlib

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.app import STAGES, AppArgs, stage_options
from serve_app.deploy import config_args

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCHER = sorted((ROOT / "cluster").glob("*.yaml"))


def test_there_are_aws_and_gcp_configs():
    assert {p.name for p in LAUNCHER} >= {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_yaml_satisfies_rays_schema(path):
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(config)  # jsonschema of ray/autoscaler/ray-schema.json; raises on any violation
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert (
        sum(t.get("max_workers", 0) for name, t in types.items() if name != config["head_node_type"])
        <= config["max_workers"]
    )
    assert any("pip install" in command and "-e" in command for command in config["setup_commands"]), (
        "setup must install this package"
    )
    assert path.read_text().startswith("# ray up cluster/")


def test_a_broken_launcher_yaml_is_caught():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    config["available_node_types"]["head"]["min_workers"] = "two"
    with pytest.raises(Exception):
        validate_config(config)


def _manifest(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / "kuberay" / name).read_text())


def _check_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and head["resources"]["limits"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"] == container["resources"]["requests"]


def test_rayjob_runs_the_xxl_training_config():
    job = _manifest("rayjob-train.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"].split()
    config = ROOT / entry[entry.index("--config") + 1]
    assert (ROOT / entry[1]).exists() and config.exists()
    _check_cluster_spec(job["spec"]["rayClusterSpec"])
    gpus = [
        g
        for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    workers = yaml.safe_load(config.read_text())["scaling"]["num_workers"]
    capacity = sum(
        g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in gpus
    )
    assert capacity >= workers, "the GPU groups cannot host the training workers of the config"


def test_rayservice_carries_a_valid_serve_config_for_the_app():
    service = _manifest("rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    assert app.import_path == "serve_app.app:build_app"
    AppArgs.model_validate(app.args)
    assert sorted(d.name for d in app.deployments) == sorted(STAGES)
    _check_cluster_spec(service["spec"]["rayClusterConfig"])


SITE = {"model_dir", "index_dir", "passages", "memory_store", "encoder_path"}  # where a cluster keeps its artifacts


def test_rayservice_agrees_with_the_serve_config(tmp_path):
    """serveConfigV2 is serve_app/config.yaml's app on other storage and hardware: every value both set is the same,
    but for the artifact paths."""
    ours = yaml.safe_load((ROOT / "serve_app" / "config.yaml").read_text())
    theirs = yaml.safe_load(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    for key in set(ours) & set(theirs) - {"applications"}:
        # http_options: the cluster sets every option ours does, to the same value (host and port are the site's)
        if isinstance(ours[key], dict):
            assert ours[key].keys() <= theirs[key].keys(), key
            assert {k: theirs[key][k] for k in ours[key]} == ours[key], key
        else:
            assert theirs[key] == ours[key], key
    (our_app,), (their_app,) = ours["applications"], theirs["applications"]
    for key in set(our_app) & set(their_app) - {"args", "deployments"}:
        assert their_app[key] == our_app[key], key
    for key in set(our_app["args"]) & set(their_app["args"]) - SITE:
        assert their_app["args"][key] == our_app["args"][key], f"args.{key}"
    our_stages = {d["name"]: d for d in our_app.get("deployments", [])}
    for stage in their_app["deployments"]:
        for option in set(stage) & set(our_stages.get(stage["name"], {})):
            assert stage[option] == our_stages[stage["name"]][option], f"{stage['name']}.{option}"
    (tmp_path / "serve.yaml").write_text(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    args = AppArgs.model_validate(config_args(str(tmp_path / "serve.yaml"), their_app["name"]))
    for stage in ("LiveEncoderReranker", "Decoder"):  # DESIGN.md section 6: batches must fill
        assert stage_options(args)[stage]["max_ongoing_requests"] >= args.max_batch_size
