"""Serve: deploy the GLIMMER Serve app on the cluster, answer one smoke question over HTTP, leave the app running.

    python jobs/serve.py --config jobs/configs/serve.yaml
    ray job submit --working-dir . -- python jobs/serve.py --config jobs/configs/serve.yaml

Deploys the app of `serve_config` (serve_app/config.yaml: `serve_app.app:build_app` with its args), with
`app` set over its args, waits until every deployment is RUNNING (or prints each failing deployment's
message), asks `question` through `glimmer_ray.client.GlimmerClient` and prints the URL and the answer.
Serve applications outlive the job's driver, so the app keeps serving after this job exits, for as long as
the cluster runs; `shutdown: true` deletes it instead. A local cluster this job starts itself (no
`ray job submit`, `ray_address: null`) stops with the job. `serve deploy serve_app/config.yaml` is the
declarative path to the same app.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ray import serve

from glimmer_ray.cli import ray_session
from glimmer_ray.client import GlimmerClient
from glimmer_ray.config import parse_job_args
from serve_app.app import AppArgs
from serve_app.deploy import ask, config_args, config_http_options, deploy


@dataclass
class ServeConfig:
    serve_config: str = "serve_app/config.yaml"  # Serve config whose application `name` is deployed
    app: dict = field(default_factory=dict)  # serve_app.app.AppArgs set over serve_config's args, e.g. app.model_dir
    name: str = "glimmer"  # Serve application name (in serve_config and on the cluster)
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
        AppArgs.model_validate(self.args())

    def args(self) -> dict:
        return {**config_args(self.serve_config, self.name), **self.app}


def main(config: ServeConfig) -> dict:
    # setup
    config.validate()
    with ray_session(config.ray_address, log_to_driver=True):
        # deploy, then one question over HTTP
        http_options = config_http_options(config.serve_config)
        url = deploy(config.args(), config.name, config.route_prefix, config.host, config.port, http_options)
        print(f"[serve] app {config.name!r} RUNNING at {url} (POST {url}/v1/answer)", flush=True)
        result = ask(GlimmerClient(url), config.question, config.task)

        # cleanup
        if config.shutdown:
            serve.delete(config.name)
            print(f"[serve] deleted app {config.name!r} (shutdown: true)")
        else:
            print(
                f"[serve] leaving {config.name!r} serving at {url} for as long as this Ray cluster runs (a local cluster "
                f"this job started stops with it); `serve shutdown` stops it"
            )
    return {
        "url": url,
        "question": config.question,
        "answer": result.answer,
        "task": result.task,
        "kept": [p.title for p in result.passages if p.selected],
        "timings": result.timings,
    }


if __name__ == "__main__":
    main(parse_job_args(ServeConfig, __doc__.splitlines()[0], sys.argv[1:]))
