"""Deploy the GLIMMER Serve app from Python and ask it a question (jobs/serve.py, the quickstart).

    with glimmer_ray.cli.ray_session(address):
        args = config_args("serve_app/config.yaml")           # the app `serve deploy serve_app/config.yaml` runs
        url = deploy({**args, "model_dir": "..."}, port=8000)  # returns once every stage is RUNNING
        ask(GlimmerClient(url), "what is the capital of Kraxbrath")

Serve applications outlive the driver that deployed them: the app keeps serving for as long as the cluster
runs, until `serve.delete(name)` or `serve.shutdown()`.
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from ray import serve

from glimmer_ray.client import GlimmerClient
from glimmer_ray.serving import AnswerResponse
from serve_app.app import build_app

SERVE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.yaml")  # the shipped Serve config


def config_args(path: str, name: str = "glimmer") -> dict[str, Any]:
    """The `build_app` args that deploy application `name` of a Serve config (serve_app/config.yaml) as `serve deploy`
    does: its `args`, with the options of its `deployments:` list set over `args.deployments`, option by option."""
    with open(path) as handle:
        applications = {app.get("name", "default"): app for app in yaml.safe_load(handle).get("applications", [])}
    if name not in applications:
        raise ValueError(f"{path} has no application named {name!r}; it has {', '.join(applications) or 'none'}")
    args = dict(applications[name].get("args") or {})
    deployments = dict(args.get("deployments", {}))
    for options in applications[name].get("deployments", []):
        stage = options["name"]
        deployments[stage] = {**deployments.get(stage, {}), **{k: v for k, v in options.items() if k != "name"}}
    if deployments:
        args["deployments"] = deployments
    return args


def config_http_options(path: str) -> dict[str, Any]:
    """The `http_options` of a Serve config (serve_app/config.yaml: `request_timeout_s`), as `serve deploy` reads them."""
    with open(path) as handle:
        return dict(yaml.safe_load(handle).get("http_options") or {})


def deploy(
    args: dict[str, Any],
    name: str = "glimmer",
    route_prefix: str = "/",
    host: str = "127.0.0.1",
    port: int = 8000,
    http_options: dict[str, Any] | None = None,
) -> str:
    """Start Serve's HTTP proxy, deploy the app with `build_app(args)` and wait until it is RUNNING; its URL.
    `http_options` are Serve's proxy options beside host and port (None: the shipped config's, `SERVE_CONFIG`:
    the proxy's `request_timeout_s`). A stage that cannot start (memory built by another encoder, a model without reading.json)
    raises a RuntimeError with each failing deployment's message."""
    options = config_http_options(SERVE_CONFIG) if http_options is None else http_options
    serve.start(http_options={**options, "host": host, "port": port})
    try:
        serve.run(build_app(args), name=name, route_prefix=route_prefix)
    except RuntimeError as error:  # DEPLOY_FAILED: the deployments' own messages say why
        status = serve.status().applications.get(name)
        deployments = status.deployments.items() if status else []
        failing = [f"  {stage}: {d.message}" for stage, d in deployments if d.status != "HEALTHY" and d.message]
        raise RuntimeError("\n".join([f"the Serve app {name!r} did not start: {error}", *failing])) from error
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}{route_prefix.rstrip('/')}"


def ask(client: GlimmerClient, question: str, task: str | None = None, gold: list[str] | None = None) -> AnswerResponse:
    """Answer one question over HTTP and print it: the answer, stage timings, retrieved passages, the ones kept."""
    result = client.answer(question, task=task)
    timings = ", ".join(f"{stage} {ms:.0f} ms" for stage, ms in result.timings.items() if not stage.startswith("batch"))
    print(
        f"\nQ ({result.task}): {question}"
        + (f"\n   gold: {' | '.join(gold)}" if gold is not None else "")
        + f"\n   answer: {result.answer!r}   ({timings})"
    )
    for passage in result.passages:
        mark = "kept" if passage.selected else "    "
        rerank = passage.rerank_score if passage.rerank_score is not None else float("nan")
        print(f"   {mark} retrieval {passage.retrieval_score:6.3f} rerank {rerank:7.3f}  {passage.title}")
    return result
