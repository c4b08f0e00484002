"""The Serve graph on a real local Ray cluster with real HTTP on 127.0.0.1: answers against the in-process
pipeline, the handle client from another process, defaults as the model was trained (reading.json), every
bad input's 4xx, a concurrent burst, a killed replica during a burst, and the refusals at start-up of memory
built by another encoder and of a model without reading.json."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests

from glimmer_ray.client import GlimmerAPIError, GlimmerClient
from glimmer_ray.data.reading import READING_FILE, load_reading
from glimmer_ray.serving import InProcessPipeline
from serve_app.app import STAGES

pytestmark = pytest.mark.ray
PORT = 8431
URL = f"http://127.0.0.1:{PORT}"
QUESTIONS = [
    "what is the capital of Kraxbrath",
    "who founded the society",
    "when was the composer born",
    "which country is the city in",
    "what currency does the country use",
]


def _args(artifacts, **overrides) -> dict:
    return {**artifacts["args"], **overrides}


@pytest.fixture(scope="module")
def app(ray_cluster, serve_artifacts):
    from ray import serve

    from serve_app.deploy import deploy

    # Two Decoder replicas: a request whose replica dies is retried on the other (test_killing_a_replica...).
    assert deploy(_args(serve_artifacts, deployments={"Decoder": {"num_replicas": 2}}), port=PORT) == URL
    yield
    serve.shutdown()


@pytest.fixture(scope="module")
def pipeline(serve_artifacts):
    from serve_app.app import AppArgs

    args = AppArgs.model_validate(_args(serve_artifacts)).resolved()
    limits = args.limits(load_reading(args.model_dir))
    return InProcessPipeline(args.model_dir, args.index_dir, args.passages, args.memory_store, limits)


def _same_answer(served: dict, local) -> None:
    assert served["answer"] == local.answer
    assert [p["id"] for p in served["passages"]] == [p.id for p in local.passages]
    assert [p["selected"] for p in served["passages"]] == [p.selected for p in local.passages]
    np.testing.assert_allclose(
        [p["rerank_score"] for p in served["passages"]], [p.rerank_score for p in local.passages], rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        [p["retrieval_score"] for p in served["passages"]],
        [p.retrieval_score for p in local.passages],
        rtol=1e-4,
        atol=1e-4,
    )


def test_http_answers_match_the_in_process_pipeline(app, pipeline):
    for question in QUESTIONS:
        response = requests.post(
            f"{URL}/v1/answer", json={"question": question, "task": "nq", "top_k": 4, "num_selected": 2}, timeout=60
        )
        assert response.status_code == 200, response.text
        body = response.json()
        _same_answer(body, pipeline.answer({"question": question, "task": "nq", "top_k": 4, "num_selected": 2}))
        assert sum(p["selected"] for p in body["passages"]) == 2 and len(body["passages"]) == 4
        assert set(body["timings"]) >= {"retriever", "memory", "live", "decoder", "total"}


def test_batch_endpoint_and_http_client(app, pipeline):
    client = GlimmerClient(URL)
    assert client.health()["status"] == "ok"
    results = client.answer_batch([{"question": q, "top_k": 3} for q in QUESTIONS[:3]])
    for question, result in zip(QUESTIONS[:3], results):
        _same_answer(result.model_dump(), pipeline.answer({"question": question, "top_k": 3}))
    with pytest.raises(GlimmerAPIError, match="num_selected must be between 1 and top_k"):
        client.answer(QUESTIONS[0], top_k=2, num_selected=3)


def test_handle_client_from_another_process_matches(app, pipeline):
    import ray

    script = (
        "import json, ray\n"
        f"ray.init(address={ray.get_runtime_context().gcs_address!r}, log_to_driver=False)\n"
        "from glimmer_ray.client import GlimmerHandleClient, GlimmerAPIError\n"
        "client = GlimmerHandleClient('glimmer')\n"
        f"out = [client.answer(q, task='tqa', top_k=4).model_dump() for q in {QUESTIONS[:2]!r}]\n"
        "try:\n    client.answer('   ')\nexcept GlimmerAPIError as e:\n    out.append({'status': e.status, 'message': e.message})\n"
        "print('RESULT' + json.dumps(out))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-2000:]
    results = json.loads(completed.stdout.split("RESULT", 1)[1])
    for question, served in zip(QUESTIONS[:2], results):
        _same_answer(served, pipeline.answer({"question": question, "task": "tqa", "top_k": 4}))
    assert results[2]["status"] == 422 and "question is empty" in results[2]["message"]


def test_defaults_are_the_models_as_trained(app, serve_artifacts):
    reading = serve_artifacts["reading"]
    response = requests.post(f"{URL}/v1/answer", json={"question": QUESTIONS[0]}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == reading.tasks[0] and body["top_k"] == len(body["passages"]) == reading.num_passages


BAD_INPUTS = [
    ({}, 422, "question: Field required"),
    ({"question": ""}, 422, "question is empty"),
    ({"question": "   "}, 422, "question is empty"),
    ({"question": 42}, 422, "question: Input should be a valid string"),
    ({"question": "capital", "top_k": "5"}, 422, "top_k: Input should be a valid integer"),
    ({"question": "capital", "top_k": 0}, 400, "top_k must be between 1 and"),
    ({"question": "capital", "top_k": 1000}, 400, "top_k must be between 1 and"),
    ({"question": "capital", "top_k": 2, "num_selected": 3}, 400, "num_selected must be between 1 and top_k (2)"),
    ({"question": "capital", "num_selected": 0}, 400, "num_selected must be between 1 and top_k"),
    ({"question": "capital", "max_new_tokens": 0}, 400, "max_new_tokens must be between 1 and"),
    ({"question": "capital", "task": "squad"}, 400, "unknown task 'squad'"),
    ({"question": "capital " * 60}, 400, "the limit is 24"),
    ({"question": "capital", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
]


@pytest.mark.parametrize("body, status, message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_gets_a_4xx_with_its_reason(app, body, status, message):
    response = requests.post(f"{URL}/v1/answer", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_health_reports_every_stage(app):
    response = requests.get(f"{URL}/healthz", timeout=30)
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "stages": {stage: "ready" for stage in STAGES}}


def test_an_oversized_batch_is_refused_and_leaves_no_work_behind(app):
    from glimmer_ray.serving import MAX_BATCH_REQUESTS

    response = requests.post(
        f"{URL}/v1/answer:batch", json={"requests": [{"question": QUESTIONS[0]}] * 1000}, timeout=60
    )
    assert response.status_code == 422 and f"at most {MAX_BATCH_REQUESTS} items" in response.json()["error"]
    start = time.monotonic()
    response = requests.post(f"{URL}/v1/answer", json={"question": QUESTIONS[1]}, timeout=60)
    assert response.status_code == 200 and time.monotonic() - start < 5.0  # nothing of the 1,000 items runs


def test_malformed_and_mistyped_bodies_are_4xx(app):
    response = requests.post(
        f"{URL}/v1/answer", data="{not json", headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]
    response = requests.post(f"{URL}/v1/answer", json=["a list"], timeout=30)
    assert response.status_code == 422
    response = requests.post(f"{URL}/v1/answer:batch", json={"requests": []}, timeout=30)
    assert response.status_code == 422 and "requests" in response.json()["error"]
    too_many = {"requests": [{"question": "capital"}] * 33}  # the batch maximum, documented in the API
    response = requests.post(f"{URL}/v1/answer:batch", json=too_many, timeout=30)
    assert response.status_code == 422 and "at most 32 items" in response.json()["error"]
    response = requests.post(
        f"{URL}/v1/answer:batch", json={"requests": [{"question": "a"}, {"question": "b", "top_k": 0}]}, timeout=30
    )
    assert response.status_code == 400 and "every request of a batch" in response.json()["error"]


def _burst(count: int, during=None) -> list[int]:
    statuses: list[int] = [0] * count

    def one(index: int) -> None:
        response = requests.post(
            f"{URL}/v1/answer", json={"question": QUESTIONS[index % len(QUESTIONS)], "top_k": 4}, timeout=120
        )
        statuses[index] = response.status_code

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    if during:
        during()
    for thread in threads:
        thread.join()
    return statuses


def test_concurrent_burst_all_succeed_and_model_stages_batch(app):
    statuses = _burst(16)
    assert statuses == [200] * 16
    metrics = requests.get(f"{URL}/v1/metrics", timeout=30).json()
    assert metrics["stage_ms"]["live"]["count"] >= 16


def test_killing_a_replica_during_a_burst(app):
    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#Decoder#" in a["name"]]
    assert len(replicas) == 2, replicas

    def kill_decoder() -> None:
        time.sleep(0.3)  # the burst is under way: the replica holds requests when it dies
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)

    before = requests.get(f"{URL}/v1/metrics", timeout=30).json()["requests"]["retried"]
    statuses = _burst(64, during=kill_decoder)
    retried = requests.get(f"{URL}/v1/metrics", timeout=30).json()["requests"]["retried"] - before
    print(f"burst with a killed Decoder replica: {statuses.count(200)} of 64 answered, {retried} retried")
    # Every request the dead replica held is retried once on the other replica: nothing fails.
    assert statuses == [200] * 64, statuses
    deadline = time.monotonic() + 120
    while True:  # Serve replaces the replica; both answer again
        alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#Decoder#" in a["name"]]
        if len(alive) == 2 and requests.get(f"{URL}/healthz", timeout=30).json()["stages"]["Decoder"] == "ready":
            break
        assert time.monotonic() < deadline, alive
        time.sleep(1)


@pytest.mark.parametrize("stage", ["Retriever", "MemoryCache", "LiveEncoderReranker"])
def test_killing_the_only_replica_of_a_stage_fails_fast_then_recovers(app, stage):
    """The stage's one replica killed during a burst: every request ends within the request's deadline (each of its
    four stage calls has one), answered or refused with a 503 that says why and when to retry, never a 500 or a
    hang; then Serve's replacement answers again and /healthz says the stage is ready."""
    import ray

    from serve_app.app import AppArgs

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"#{stage}#" in a["name"]]
    assert len(replicas) == 1, replicas
    deadline_s = 4 * AppArgs().stage_timeout_s
    outcomes: list[tuple[int, float, dict]] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        start = time.monotonic()
        response = requests.post(
            f"{URL}/v1/answer", json={"question": QUESTIONS[index % len(QUESTIONS)], "top_k": 4}, timeout=120
        )
        with lock:
            outcomes.append((response.status_code, time.monotonic() - start, dict(response.headers)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # the burst is under way
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    for thread in threads:
        thread.join()
    statuses = [status for status, _, _ in outcomes]
    print(f"{stage} killed during a 24-request burst: {statuses.count(200)} answered, {statuses.count(503)} got 503")
    assert set(statuses) <= {200, 503}, statuses
    assert max(seconds for _, seconds, _ in outcomes) < deadline_s
    assert all("retry-after" in {k.lower() for k in headers} for status, _, headers in outcomes if status == 503)
    deadline = time.monotonic() + 180
    while True:  # Serve replaces the replica and the stage answers again
        health = requests.get(f"{URL}/healthz", timeout=30)
        if health.status_code == 200 and health.json()["stages"][stage] == "ready":
            break
        assert time.monotonic() < deadline, health.text
        time.sleep(1)
    assert requests.post(f"{URL}/v1/answer", json={"question": QUESTIONS[0]}, timeout=120).status_code == 200


def _chromium() -> str:
    """Debian's Chromium (.ci/run installs it); outside CI a machine without it skips the browser test."""
    import os
    import shutil

    path = os.environ.get("GLIMMER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        if os.environ.get("CI"):
            pytest.fail("CI needs Chromium for the demo page's browser test: apt-get install chromium")
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    return path


def test_demo_page_answers_in_a_real_browser(app, pipeline, tmp_path):
    """GET / in headless Chromium: type a question, submit, and the page shows the answer and the k passages with
    both scores, the m kept marked, as the in-process pipeline answers it."""
    import os
    import shutil

    from playwright.sync_api import sync_playwright

    local = pipeline.answer({"question": QUESTIONS[0]})
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(f"{URL}/")
        assert page.title() == "glimmer-ray"
        assert page.locator("#task option").all_inner_texts()[1:] == list(pipeline.limits.tasks)
        page.fill("#question", QUESTIONS[0])
        page.click("#submit")
        page.wait_for_selector("#passages:not([hidden])", timeout=60_000)
        answer = page.inner_text("#answer")
        rows = page.locator("#passages tbody tr")
        ids = [rows.nth(i).get_attribute("data-id") for i in range(rows.count())]
        classes = [rows.nth(i).get_attribute("class") for i in range(rows.count())]
        kept = [i for i, row_class in zip(ids, classes) if row_class == "kept"]
        rerank = page.locator("#passages tbody tr td:nth-child(4)").all_inner_texts()
        screenshot = tmp_path / "demo.png"
        page.screenshot(path=str(screenshot), full_page=True)
        page.fill("#top_k", "999")  # more than the app allows: the API's own 400 reaches the page
        page.fill("#question", QUESTIONS[1])
        page.click("#submit")
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=60_000)
        error = page.inner_text("#error")
        browser.close()
    assert answer == local.answer
    assert ids == [p.id for p in local.passages]
    assert kept == [p.id for p in local.passages if p.selected] and 0 < len(kept) < len(ids)
    assert rerank == [f"{p.rerank_score:.3f}" for p in local.passages]
    assert error.startswith("400: ") and "top_k" in error, error
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("GLIMMER_DEMO_SCREENSHOT"):  # how docs/images/demo.png is made
        shutil.copy(screenshot, os.environ["GLIMMER_DEMO_SCREENSHOT"])


def _refused_deployments(failing: str) -> dict:
    """Deployments of an app that must fail at start-up: `failing` tries its constructor once, and no stage takes a
    CPU (the module's app, scaled up by earlier tests, may hold them all until Serve's 10-minute downscale delay; a
    replica waiting for a CPU would keep the app deploying instead of failing)."""
    options = {stage: {"ray_actor_options": {"num_cpus": 0}} for stage in STAGES}
    options[failing].update(num_replicas=1, max_constructor_retry_count=1)
    return options


def test_memory_of_another_encoder_is_refused_at_start_up(app, serve_artifacts):
    from ray import serve

    from serve_app.app import build_app

    bad = build_app(
        _args(
            serve_artifacts,
            model_dir=serve_artifacts["other_model"],
            deployments=_refused_deployments("LiveEncoderReranker"),
        )
    )
    with pytest.raises(RuntimeError, match="LiveEncoderReranker"):
        serve.run(bad, name="mismatched", route_prefix="/mismatched")
    message = serve.status().applications["mismatched"].deployments["LiveEncoderReranker"].message
    assert "MemoryEncoderMismatch" in message and "rebuild the memory with jobs/build_memory.py" in message
    serve.delete("mismatched")
    assert requests.post(f"{URL}/v1/answer", json={"question": QUESTIONS[0]}, timeout=60).status_code == 200


def test_a_model_without_reading_json_is_refused_at_start_up(app, serve_artifacts, tmp_path):
    import shutil

    from ray import serve

    from serve_app.deploy import deploy

    unread = shutil.copytree(serve_artifacts["model"], tmp_path / "model", ignore=shutil.ignore_patterns(READING_FILE))
    args = _args(
        serve_artifacts,
        model_dir=str(unread),
        deployments=_refused_deployments("Ingress"),
    )
    with pytest.raises(RuntimeError) as refused:
        deploy(args, name="unread", route_prefix="/unread", port=PORT)
    assert "Ingress" in str(refused.value) and f"{unread / READING_FILE} is missing" in str(refused.value)
    serve.delete("unread")
    assert requests.post(f"{URL}/v1/answer", json={"question": QUESTIONS[0]}, timeout=60).status_code == 200


def test_the_fused_app_answers_as_the_in_process_pipeline(app, pipeline, serve_artifacts):
    """fused_stages: the four stages inside the Ingress (no hop after the HTTP proxy): the same answers, ids, kept
    passages and scores as the in-process pipeline, and /healthz reports the one deployment it has."""
    from ray import serve

    from serve_app.deploy import deploy

    deploy(_args(serve_artifacts, fused_stages=True), name="fused", route_prefix="/fused", port=PORT)
    try:
        for question in QUESTIONS:
            body = {"question": question, "task": "nq", "top_k": 4, "num_selected": 2}
            response = requests.post(f"{URL}/fused/v1/answer", json=body, timeout=60)
            assert response.status_code == 200, response.text
            _same_answer(response.json(), pipeline.answer(body))
            assert set(response.json()["timings"]) >= {"retriever", "memory", "live", "decoder", "total"}
        health = requests.get(f"{URL}/fused/healthz", timeout=30).json()
        assert health == {"status": "ok", "stages": {"Ingress": "ready"}}
    finally:
        serve.delete("fused")
