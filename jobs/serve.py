"""Serve: deploy the GLIMMER Serve app on the cluster, answer one smoke question over HTTP, leave the app running.

    python jobs/serve.py --config jobs/configs/serve.yaml
    ray job submit --working-dir . -- python jobs/serve.py --config jobs/configs/serve.yaml

Deploys `serve_app.app:build_app` with the config's `app` (its `AppArgs`: model, index, memory store,
limits, per-stage replicas), waits until every deployment is RUNNING (or prints each failing deployment's
message), asks `question` through `glimmer_ray.client.GlimmerClient` and prints the URL and the answer.
Serve applications outlive the job's driver, so the app keeps serving after this job exits, for as long as
the cluster runs; `shutdown: true` deletes it instead. A local cluster this job starts itself (no
`ray job submit`, `ray_address: null`) stops with the job. `serve deploy serve_app/config.yaml` is the
declarative path to the same app.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve

from glimmer_ray.client import GlimmerClient
from glimmer_ray.config import parse_job_args
from glimmer_ray.serving import AnswerResponse
from serve_app.app import AppArgs, build_app


@dataclass
class ServeConfig:
    app: dict = field(
        default_factory=lambda: {
            "model_dir": "outputs/quickstart/model",
            "index_dir": "outputs/quickstart/index",
            "passages": "outputs/quickstart/passages.parquet",
            "memory_store": "outputs/quickstart/memory",
        }
    )  # AppArgs
    name: str = "glimmer"  # Serve application name
    route_prefix: str = "/"  # HTTP path the app answers under
    host: str = "127.0.0.1"  # HTTP host of the Serve proxy; 0.0.0.0 accepts other machines
    port: int = 8000  # HTTP port of the Serve proxy
    question: str = "what is the capital of Kraxbrath"  # smoke question asked over HTTP once the app runs
    task: str | None = None  # its task prefix; null = the app's default_task
    shutdown: bool = False  # true: delete the app after the smoke question; false: leave it serving
    ray_address: str | None = None  # null: the cluster of `ray job submit`, else a new local one

    def validate(self) -> None:
        unknown = sorted(set(self.app) - set(AppArgs.model_fields))
        if unknown:
            raise ValueError(
                f"unknown key app.{unknown[0]}; allowed keys here: {', '.join(sorted(AppArgs.model_fields))}"
            )
        AppArgs.model_validate(self.app)


def deploy(
    args: dict[str, Any], name: str = "glimmer", route_prefix: str = "/", host: str = "127.0.0.1", port: int = 8000
) -> str:
    """Start Serve's HTTP proxy, deploy the app and wait until it is RUNNING; its URL."""
    serve.start(http_options={"host": host, "port": port})
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


def main(config: ServeConfig) -> dict:
    # setup
    config.validate()
    started_ray = not ray.is_initialized()  # disconnect only a driver this job connected
    ray.init(address=config.ray_address, ignore_reinit_error=True, log_to_driver=True)

    # deploy, then one question over HTTP
    url = deploy(config.app, config.name, config.route_prefix, config.host, config.port)
    print(f"[serve] app {config.name!r} RUNNING at {url} (POST {url}/v1/answer)", flush=True)
    result = ask(GlimmerClient(url), config.question, config.task)
    summary = {
        "url": url,
        "question": config.question,
        "answer": result.answer,
        "task": result.task,
        "kept": [p.title for p in result.passages if p.selected],
        "timings": result.timings,
    }

    # cleanup
    if config.shutdown:
        serve.delete(config.name)
        print(f"[serve] deleted app {config.name!r} (shutdown: true)")
    else:
        print(
            f"[serve] leaving {config.name!r} serving at {url} for as long as this Ray cluster runs (a local cluster this job "
            f"started stops with it); `serve shutdown` stops it"
        )
    if started_ray:
        ray.shutdown()
    return summary


if __name__ == "__main__":
    main(parse_job_args(ServeConfig, __doc__.splitlines()[0], sys.argv[1:]))
