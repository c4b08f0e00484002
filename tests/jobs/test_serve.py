"""The serve job (jobs/serve.py) once on tiny artifacts: it deploys serve_app/config.yaml's app with the artifacts
set over its args, answers its smoke question over real HTTP and leaves the app serving."""

from __future__ import annotations

import pathlib

import pytest
import requests

pytestmark = pytest.mark.ray
ROOT = pathlib.Path(__file__).resolve().parents[2]
PORT = 8433


def test_serve_job_deploys_answers_and_leaves_the_app_serving(ray_cluster, serve_artifacts, load_job):
    from ray import serve

    serve_job = load_job("serve")
    config = serve_job.ServeConfig(
        serve_config=str(ROOT / "serve_app" / "config.yaml"), app=serve_artifacts["args"], port=PORT
    )
    try:
        summary = serve_job.main(config)
        assert summary["url"] == f"http://127.0.0.1:{PORT}" and summary["question"] == config.question
        assert isinstance(summary["answer"], str) and summary["task"] == serve_artifacts["reading"].tasks[0]
        assert len(summary["kept"]) == 2 and all(isinstance(title, str) for title in summary["kept"])  # m of the reader
        assert set(summary["timings"]) >= {"retriever", "memory", "live", "decoder", "total"}
        assert requests.get(f"{summary['url']}/healthz", timeout=30).json()["status"] == "ok"  # still serving
    finally:
        serve.shutdown()
