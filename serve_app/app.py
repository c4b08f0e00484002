"""The GLIMMER Serve application: Ingress -> Retriever -> MemoryCache -> LiveEncoderReranker -> Decoder.

    serve run serve_app.app:build_app artifacts_dir=DIR                          (development; DIR of jobs/quickstart.py)
    GLIMMER_ARTIFACTS_DIR=DIR serve run serve_app/config.yaml                    (the same, from the config)
    serve deploy serve_app/config.yaml                                           (a running cluster)

Settings: the defaults are `AppArgs` and `default_options` below; serve_app/config.yaml sets only what
differs from them. The question length, the task list and the default k and answer length are the
model's own, as trained: its reading.json (`glimmer_ray.data.reading`), read when the ingress starts.

One deployment per stage, each with its own replicas, autoscaling and resources (set in the Serve
config's `deployments:` section or in `AppArgs.deployments`). The model stages batch requests
dynamically with `@serve.batch`; stage outputs travel as numpy arrays and are chained as
`DeploymentResponse`s, so the memory of the k passages goes from the cache to the live encoder and
the encoding from the live encoder to the decoder without passing through the ingress.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at run time, in
# the replica, where string annotations of functions shipped by value cannot be resolved.
import asyncio
import dataclasses
import json
import logging
import os
import time
from collections import defaultdict, deque
from typing import Annotated, Any, Literal

import numpy as np
import ray
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.metrics import Histogram

from glimmer_ray.data.reading import ReadingConfig, load_reading
from glimmer_ray.memory.store import MemoryStore, MemoryStoreError
from glimmer_ray.retrieval.retriever import Retriever as DenseRetriever
from glimmer_ray.runtime import torch_dtype
from glimmer_ray.serving import (
    AnswerRequest,
    AnswerResponse,
    BatchRequest,
    Limits,
    MemoryLookup,
    QuestionTokenizer,
    ReaderStages,
    RequestError,
    assemble_response,
)

logger = logging.getLogger("ray.serve")
STAGES = ("Retriever", "MemoryCache", "LiveEncoderReranker", "Decoder", "Ingress")
FUSED_STAGES = ("Ingress",)  # fused_stages: true, the four stages inside the Ingress's replicas
ARTIFACT_NAMES = {"model_dir": "model", "index_dir": "index", "passages": "passages.parquet", "memory_store": "memory"}
ARTIFACTS_ENV = "GLIMMER_ARTIFACTS_DIR"  # where serve run / serve deploy of serve_app/config.yaml find the artifacts
MODEL_STAGES = ("LiveEncoderReranker", "Decoder")  # the stages that run the reader: `device` and `dtype` are theirs
FUSED_MODEL_STAGES = ("Ingress",)
GRAPH_BATCH_WAIT_S, FUSED_BATCH_WAIT_S = 0.005, 0.001  # batch_wait_timeout_s by default (jobs/benchmark_serve.py)


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of the Serve config). Paths are resolved to absolute ones.
    Null `default_task`, `top_k` and `max_new_tokens` are the model's, as trained (its reading.json)."""

    model_config = ConfigDict(extra="forbid")

    artifacts_dir: str | None = (
        None  # a directory laid out as jobs/quickstart.py writes one (model/, index/, passages.parquet, memory/): the four paths below that are not given are taken under it; null = $GLIMMER_ARTIFACTS_DIR where set
    )
    model_dir: str = "outputs/quickstart/model"  # trained reader, its tokenizer and reading.json (jobs/train.py export)
    index_dir: str = "outputs/quickstart/index"  # FAISS index (jobs/prepare_data.py)
    passages: str = "outputs/quickstart/passages.parquet"  # passage table behind the index
    memory_store: str = "outputs/quickstart/memory"  # jobs/build_memory.py output, local path or URI
    encoder_path: str | None = None  # sentence-transformers query encoder; null = packaged all-MiniLM-L6-v2
    default_task: str | None = None  # task of requests that name none; null = the first task the model was trained on
    top_k: int | None = None  # default k; null = as trained (reading.num_passages)
    max_top_k: int = 25
    max_new_tokens: int | None = None  # default answer length limit (tokens); null = as trained (reading.answer_tokens)
    max_new_tokens_limit: int = 32
    cache_bytes: int = 1 << 30  # MemoryCache LRU budget per replica
    verify_memory: Literal["all", "open"] = (
        "all"  # all: every shard's sha256 at start-up; open: when first read (huge stores)
    )
    device: str = (
        "cpu"  # the model stages' (LiveEncoderReranker, Decoder): cpu | cuda; cuda needs num_gpus in their deployments
    )
    dtype: str = "float32"  # the model stages' weights and activations: float32 | bfloat16 | float16
    max_batch_size: int = 8  # dynamic batching of the model stages
    batch_wait_timeout_s: float | None = (
        None  # s a batch waits to fill; null: 0.005 in the graph (three batching stages), 0.001 fused (its one)
    )
    stage_timeout_s: float = 20.0  # deadline of each stage call: past it the request gets a 503 with Retry-After
    fused_stages: bool = False  # true: retriever, memory, live encoder and decoder run inside the Ingress (no hop after
    # the HTTP proxy), for one machine or a small reader; false: each stage a deployment that scales on its own
    deployments: dict[str, dict[str, Any]] = Field(
        default_factory=dict
    )  # per-stage .options(), over the defaults below

    @model_validator(mode="before")
    @classmethod
    def _not_as_trained(cls, args: Any) -> Any:
        moved = sorted({"question_tokens", "tasks"} & set(args)) if isinstance(args, dict) else []
        if moved:
            raise ValueError(
                f"{' and '.join(moved)} are no longer app args: the app reads them from the model's reading.json "
                f"(as trained); remove them"
            )
        return args

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        torch_dtype(value)  # raises, naming the choices
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "cpu" and not (value == "cuda" or value.startswith("cuda:")):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {value!r}")
        return value  # whether a GPU is there is checked where the stage runs (a GPU node), not here

    def resolved(self) -> "AppArgs":
        """Absolute artifact paths: a path given is taken as it is; one not given is <artifacts_dir>/<its name>
        when `artifacts_dir` (or $GLIMMER_ARTIFACTS_DIR) is set, else its default."""
        root = self.artifacts_dir or os.environ.get(ARTIFACTS_ENV) or None
        absolute = {}
        for name, file_name in ARTIFACT_NAMES.items():
            value = getattr(self, name)
            if root and name not in self.model_fields_set:
                value = os.path.join(root, file_name)
            absolute[name] = value if "://" in value else os.path.abspath(value)
        if root:
            absolute["artifacts_dir"] = root if "://" in root else os.path.abspath(root)
        if self.batch_wait_timeout_s is None:  # at one client every batching point adds its whole wait to a request
            absolute["batch_wait_timeout_s"] = FUSED_BATCH_WAIT_S if self.fused_stages else GRAPH_BATCH_WAIT_S
        stages = self.stages
        unknown = sorted(set(self.deployments) - set(stages))
        if unknown:
            raise ValueError(
                f"unknown deployment(s) {', '.join(unknown)} in args.deployments; the stages are {', '.join(stages)}"
                f" (fused_stages: {str(self.fused_stages).lower()})"
            )
        return self.model_copy(update=absolute)

    @property
    def stages(self) -> tuple[str, ...]:
        """The app's deployments: the four stages and the Ingress, or the Ingress alone, running them (fused)."""
        return FUSED_STAGES if self.fused_stages else STAGES

    def limits(self, reading: ReadingConfig, max_top_k: int | None = None) -> Limits:
        """What requests may ask: the model's settings as trained, where these args leave them null."""
        default_task = self.default_task or reading.tasks[0]
        if default_task not in reading.tasks:
            raise ValueError(
                f"default_task {default_task!r} is not a task the model was trained on ({', '.join(reading.tasks)}); "
                f"name one of them, or null for the first"
            )
        return Limits(
            reading.tasks,
            default_task,
            reading.question_tokens,
            reading.num_passages if self.top_k is None else self.top_k,
            max_top_k or self.max_top_k,
            reading.answer_tokens if self.max_new_tokens is None else self.max_new_tokens,
            self.max_new_tokens_limit,
        )


def default_options(args: AppArgs) -> dict[str, dict[str, Any]]:
    """Per-stage defaults, sized so the whole graph fits a 2-CPU machine; override per cluster."""
    model_stage = {
        "ray_actor_options": {"num_cpus": 0.25},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": args.max_batch_size},
        "max_ongoing_requests": 2 * args.max_batch_size,
        "max_queued_requests": 256,
    }
    return {
        "Retriever": {
            "ray_actor_options": {"num_cpus": 0.25},
            "max_ongoing_requests": 32,
            "max_queued_requests": 256,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
        },
        "MemoryCache": {
            "ray_actor_options": {"num_cpus": 0.1},
            "max_ongoing_requests": 32,
            "max_queued_requests": 256,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
        },
        "LiveEncoderReranker": dict(model_stage),
        "Decoder": dict(model_stage),
        "Ingress": {
            "ray_actor_options": {"num_cpus": 0.5 if args.fused_stages else 0.1},  # fused: it runs the reader
            "max_ongoing_requests": 64,
            "max_queued_requests": 128,
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": args.max_batch_size if args.fused_stages else 32,
            },
        },
    }


def stage_options(args: AppArgs) -> dict[str, dict[str, Any]]:
    """Each stage's `.options()`: `default_options`, then `args.deployments` over them (an option set there
    replaces its default whole, as in the Serve config's `deployments:`)."""
    options = {name: value for name, value in default_options(args).items() if name in args.stages}
    for stage, override in args.deployments.items():
        base = dict(options[stage])
        if "num_replicas" in override:  # a fixed replica count replaces autoscaling
            base.pop("autoscaling_config", None)
        options[stage] = {**base, **override}
    if args.device != "cpu":
        model_stages = FUSED_MODEL_STAGES if args.fused_stages else MODEL_STAGES
        without = [stage for stage in model_stages if not options[stage].get("ray_actor_options", {}).get("num_gpus")]
        if without:
            raise ValueError(
                f"device {args.device!r} runs the model stages on a GPU, but {' and '.join(without)} reserve none: "
                f"set args.deployments.<stage>.ray_actor_options.num_gpus (e.g. 1, or 0.5 to share one GPU)"
            )
    return options


def _ms(start: float) -> float:
    return 1e3 * (time.perf_counter() - start)


# ---- Stage deployments ---------------------------------------------------------------------------


@serve.deployment
class Retriever:
    """Query encoder + FAISS: the top k passages with their text."""

    def __init__(
        self, index_dir: str, passages: str, encoder_path: str | None, max_batch_size: int, batch_wait_timeout_s: float
    ) -> None:
        self.retriever = DenseRetriever(index_dir, passages, encoder_path)
        self.search.set_max_batch_size(max_batch_size)
        self.search.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def search(self, questions: list[str], top_ks: list[int]) -> list[dict[str, Any]]:
        return _search(self.retriever, questions, top_ks)

    def num_passages(self) -> int:
        return self.retriever.num_passages

    def check_health(self) -> None:
        _check_index(self.retriever)


@serve.deployment
class MemoryCache:
    """The memory store's reader with its LRU cache: memory [k, lp, d] of the retrieved passages."""

    def __init__(self, memory_store: str, cache_bytes: int, verify: str = "all") -> None:
        self.lookup = MemoryLookup(memory_store, cache_bytes, verify)  # a corrupt store never starts
        self.broken: str | None = None  # a failed store check at read time: the replica is unhealthy from then on

    def fetch(self, retrieved: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            memory, mask = self.lookup.fetch(retrieved["ids"])
        except MemoryStoreError as error:
            self.broken = str(error)
            raise
        return {
            "memory": memory,
            "memory_mask": mask,
            "retrieval_scores": np.asarray(retrieved["scores"], dtype=np.float32),  # [k], for a retrieval prior
            "ms": _ms(start),
            "cache": self.lookup.cache.stats(),
        }

    def check_health(self) -> None:
        if self.broken:
            raise RuntimeError(f"the memory store failed a check: {self.broken}")
        store = self.lookup.store
        missing = [
            s["file"] for s in store.manifest["shards"] if not store.fs.get_file_info(f"{store.root}/{s['file']}").size
        ]
        if missing:
            raise RuntimeError(f"memory shards unreadable: {', '.join(missing[:3])}")


@serve.deployment
class LiveEncoderReranker:
    """Question memory, live stage A over k, scores, top m, live stage B over m (batched)."""

    def __init__(
        self,
        model_dir: str,
        memory_store: str,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        self.reader = _reader_of(model_dir, memory_store, device, dtype)
        self.encode.set_max_batch_size(max_batch_size)
        self.encode.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def encode(
        self, question_ids: list[np.ndarray], memories: list[dict[str, Any]], num_selected: list[int]
    ) -> list[dict[str, Any]]:
        return _live(self.reader, question_ids, memories, num_selected)

    def num_selected(self) -> int | None:
        return self.reader.model.config.num_selected

    def check_health(self) -> None:
        _check_weights(self.reader)


@serve.deployment
class Decoder:
    """Greedy generation with a key/value cache over the fused encoding (batched)."""

    def __init__(
        self,
        model_dir: str,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        self.reader = ReaderStages(model_dir, device, dtype)
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def generate(self, encodings: list[dict[str, Any]], max_new_tokens: list[int]) -> list[dict[str, Any]]:
        return _generate(self.reader, encodings, max_new_tokens)

    def check_health(self) -> None:
        _check_weights(self.reader)


class Reader:
    """The four stages in one process (`fused_stages: true`, inside each Ingress replica): a batch of questions
    retrieved, its memory fetched, read by the live encoder and reranker and decoded in one call, with no hop between
    the stages; it scales with the Ingress."""

    def __init__(
        self,
        index_dir: str,
        passages: str,
        encoder_path: str | None,
        memory_store: str,
        cache_bytes: int,
        verify: str,
        model_dir: str,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        self.retriever = DenseRetriever(index_dir, passages, encoder_path)
        self.memory = MemoryCache.func_or_class(memory_store, cache_bytes, verify)  # the same reader and checks
        self.reader = _reader_of(model_dir, memory_store, device, dtype)
        self.answer.set_max_batch_size(max_batch_size)
        self.answer.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def answer(
        self,
        questions: list[str],
        question_ids: list[np.ndarray],
        top_ks: list[int],
        num_selected: list[int],
        max_new_tokens: list[int],
    ) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
        """(retrieved, encoding, generated) of each question, as the Retriever, LiveEncoderReranker and Decoder give."""
        retrieved = _search(self.retriever, questions, top_ks)
        memories = [self.memory.fetch(result) for result in retrieved]
        encodings = _live(self.reader, question_ids, memories, num_selected)
        generated = _generate(self.reader, encodings, max_new_tokens)
        return list(zip(retrieved, encodings, generated))

    def num_passages(self) -> int:
        return self.retriever.num_passages

    def num_selected(self) -> int | None:
        return self.reader.model.config.num_selected

    def check_health(self) -> None:
        _check_index(self.retriever)
        self.memory.check_health()
        _check_weights(self.reader)


def _reader_of(model_dir: str, memory_store: str, device: str, dtype: str) -> ReaderStages:
    """The reader's stages, refusing a memory store built by another memory encoder."""
    reader = ReaderStages(model_dir, device, dtype)
    MemoryStore(memory_store, verify="none").check_model(reader.memory_encoder_fingerprint)
    return reader


def _search(retriever: DenseRetriever, questions: list[str], top_ks: list[int]) -> list[dict[str, Any]]:
    """The top k passages of each question (one search at the largest k), with the batch's time."""
    start = time.perf_counter()
    results = retriever.search(questions, max(top_ks))
    elapsed = _ms(start)
    return [dict({key: value[:k] for key, value in result.items()}, ms=elapsed) for result, k in zip(results, top_ks)]


def _live(
    reader: ReaderStages, question_ids: list[np.ndarray], memories: list[dict[str, Any]], num_selected: list[int]
) -> list[dict[str, Any]]:
    """Question memory, live stage A over k, scores, top m, live stage B over m, for a batch."""
    start = time.perf_counter()
    requests = [
        {
            "question_ids": q,
            "memory": mem["memory"],
            "memory_mask": mem["memory_mask"],
            "num_selected": min(m, len(mem["memory"])),
            "retrieval_scores": mem["retrieval_scores"],
        }
        for q, mem, m in zip(question_ids, memories, num_selected)
    ]
    results = reader.live(requests)
    elapsed = _ms(start)
    return [
        dict(result, ms=elapsed, memory_ms=mem["ms"], batch=len(requests)) for result, mem in zip(results, memories)
    ]


def _generate(reader: ReaderStages, encodings: list[dict[str, Any]], max_new_tokens: list[int]) -> list[dict[str, Any]]:
    """Greedy answers of a batch of encodings."""
    start = time.perf_counter()
    tokens = reader.decode(
        [{"hidden": e["hidden"], "mask": e["mask"], "max_new_tokens": n} for e, n in zip(encodings, max_new_tokens)]
    )
    elapsed = _ms(start)
    return [{"tokens": t, "ms": elapsed, "batch": len(tokens)} for t in tokens]


def _check_index(retriever: DenseRetriever) -> None:
    if retriever.index.index.ntotal == 0:
        raise RuntimeError("the FAISS index is empty")


def _check_weights(reader: ReaderStages) -> None:
    if not next(reader.model.parameters()).isfinite().all():
        raise RuntimeError("the reader's weights are not finite")


# ---- Ingress -------------------------------------------------------------------------------------

api = FastAPI(
    title="glimmer-ray", description="GLIMMER retrieval-augmented answers: retrieve, rerank in the reader, generate."
)
UNAVAILABLE = (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    ray.exceptions.RayActorError,
    ray.exceptions.ActorUnavailableError,
)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = error.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        return JSONResponse(status_code=400, content={"error": "malformed JSON in the request body"})
    messages = []
    for problem in problems:
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
        messages.append(f"{where or 'body'}: {problem.get('msg')}")
    return JSONResponse(status_code=422, content={"error": "; ".join(messages)})


@api.exception_handler(RequestError)
async def _bad_request(request: Request, error: RequestError) -> JSONResponse:
    return JSONResponse(status_code=400, content={"error": str(error)})


class StageTimeout(Exception):
    """A stage did not answer within its deadline (down, restarting or overloaded)."""

    def __init__(self, stage: str, seconds: float) -> None:
        super().__init__(f"{stage} did not answer within {seconds:g} s")


async def _awaited(response) -> Any:
    return await response


def stage_health(deployment) -> str:
    """ready | degraded | down, from a deployment's entry in `serve.status()` (None: not deployed)."""
    running = deployment.replica_states.get("RUNNING", 0) if deployment else 0
    if not running:
        return "down"
    return "ready" if deployment.status == "HEALTHY" else "degraded"


def replica_died(error: BaseException) -> bool:
    """Whether a stage call failed because the replica running it died (ActorDiedError), however Serve wraps it
    (a RayTaskError's `cause`, or a RayServeException raised from it when an upstream stage of the chain died)."""
    for _ in range(4):
        if error is None:
            return False
        if isinstance(error, ray.exceptions.ActorDiedError):
            return True
        error = getattr(error, "cause", None) or error.__cause__
    return False


def failure_response(error: BaseException) -> tuple[int, dict[str, str], dict[str, str]]:
    """(status, body, headers) of a request that failed in a stage. A stage overloaded or restarting is a 503 with
    Retry-After (retry); anything else is a 500 (do not retry) whose reason is one line: no traceback, no paths
    (the whole error goes to the replica's log). Ray wraps a stage's exception; its `cause` is the original."""
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, StageTimeout):
        return 503, {"error": f"{cause}; retry"}, {"Retry-After": "1"}
    if isinstance(error, UNAVAILABLE) or isinstance(cause, UNAVAILABLE):
        reason = f"a serving stage is overloaded or restarting ({type(cause).__name__}); retry"
        return 503, {"error": reason}, {"Retry-After": "1"}
    if isinstance(cause, MemoryStoreError):
        return (
            500,
            {"error": "the memory store failed a check (corrupt or changed); rebuild it with jobs/build_memory.py"},
            {},
        )
    return 500, {"error": f"a serving stage failed: {type(cause).__name__}"}, {}


@api.exception_handler(Exception)
async def _stage_failure(request: Request, error: Exception) -> JSONResponse:
    status, body, headers = failure_response(error)
    logger.error("request failed with %d: %r", status, error)
    return JSONResponse(status_code=status, content=body, headers=headers)


DEMO_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.html")


def demo_page(tasks: tuple[str, ...]) -> str:
    """serve_app/demo.html with the model's tasks in its task menu (JSON, '<' escaped so it cannot end the script)."""
    with open(DEMO_PAGE, encoding="utf-8") as page:
        return page.read().replace("__TASKS__", json.dumps(list(tasks)).replace("<", "\\u003c"))


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP API and the handle API (`answer_payload`); tokenises, chains the stages, assembles answers."""

    def __init__(self, retriever, memory_cache, live, decoder, model_dir: str, args: dict[str, Any]) -> None:
        """The four stages' handles; with `fused_stages`, None for each: the replica runs the stages itself (`Reader`)."""
        self.args = AppArgs.model_validate(args)
        self.limits = self.args.limits(load_reading(model_dir))  # as trained; no reading.json: refused at start-up
        self.retriever, self.memory_cache, self.live, self.decoder = retriever, memory_cache, live, decoder
        self.reader: Reader | None = None
        if self.args.fused_stages:
            self.reader = Reader(
                self.args.index_dir,
                self.args.passages,
                self.args.encoder_path,
                self.args.memory_store,
                self.args.cache_bytes,
                self.args.verify_memory,
                model_dir,
                self.args.max_batch_size,
                self.args.batch_wait_timeout_s,
                self.args.device,
                self.args.dtype,
            )
        self.questions = QuestionTokenizer(model_dir, self.limits.question_tokens)
        self.model_num_selected: int | None = None
        self.max_top_k: int | None = None
        self.latency = Histogram(
            "glimmer_stage_latency_ms",
            description="per-stage latency of answered requests",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
            tag_keys=("stage",),
        )
        self.recent: dict[str, deque] = defaultdict(lambda: deque(maxlen=1000))
        self.counts = {"answered": 0, "rejected": 0, "retried": 0}
        self.demo_page = demo_page(self.limits.tasks)

    async def _limits(self) -> Limits:
        if self.max_top_k is None and self.reader is not None:
            self.max_top_k = min(self.args.max_top_k, self.reader.num_passages())
            self.model_num_selected = self.reader.num_selected()
        elif self.max_top_k is None:
            self.max_top_k = min(self.args.max_top_k, await self.retriever.num_passages.remote())
            self.model_num_selected = await self.live.num_selected.remote()
        return dataclasses.replace(self.limits, max_top_k=self.max_top_k)

    def check_health(self) -> None:
        """Serve's health check: fused, the stages this replica runs (index, memory store, weights)."""
        if self.reader is not None:
            self.reader.check_health()

    async def _answer(self, request: AnswerRequest) -> AnswerResponse:
        """`_answer_once`, retried once when a replica died under the request and every stage still has a running
        replica (Serve's router has then dropped the dead one, so the retry reaches another). Safe: every stage only
        reads. With a stage down the retry could only wait for its replacement, so the failure is returned at once."""
        try:
            return await self._answer_once(request)
        except Exception as error:
            if not replica_died(error) or "down" in self._stage_states().values():
                raise
            self.counts["retried"] += 1
            logger.warning("a replica died under a request; retrying it once: %r", error)
            return await self._answer_once(request)

    def _stage_states(self) -> dict[str, str]:
        overview = serve.status().applications[serve.get_replica_context().app_name]
        return {name: stage_health(overview.deployments.get(name)) for name in self.args.stages}

    async def _answer_once(self, request: AnswerRequest) -> AnswerResponse:
        start = time.perf_counter()
        task, k, m, max_new_tokens = (await self._limits()).resolve(request, self.model_num_selected)
        question_ids = self.questions(task, request.question)
        if self.reader is not None:  # fused: in this replica, batched with the requests it serves concurrently
            answered = self.reader.answer(request.question, question_ids, k, m, max_new_tokens)
            retrieved, encoding, generated = await self._within_deadline("Reader", answered, [])
        else:
            retrieved = self.retriever.search.remote(request.question, k)
            memory = self.memory_cache.fetch.remote(retrieved)
            encoding = self.live.encode.remote(question_ids, memory, m)
            generated = self.decoder.generate.remote(encoding, max_new_tokens)
            calls = [retrieved, memory, encoding, generated]  # cancelled together when one misses its deadline
            chain = [("Retriever", retrieved), ("LiveEncoderReranker", encoding), ("Decoder", generated)]
            retrieved, encoding, generated = [await self._within_deadline(stage, r, calls) for stage, r in chain]
        timings = {
            "retriever": retrieved["ms"],
            "memory": encoding["memory_ms"],
            "live": encoding["ms"],
            "decoder": generated["ms"],
        }
        timings["total"] = _ms(start)
        timings["batch_live"], timings["batch_decoder"] = encoding["batch"], generated["batch"]
        for stage, value in timings.items():
            if not stage.startswith("batch"):
                self.latency.observe(value, tags={"stage": stage})
                self.recent[stage].append(value)
        self.counts["answered"] += 1
        return assemble_response(
            task,
            k,
            m,
            {key: retrieved[key] for key in ("ids", "titles", "texts", "scores")},
            encoding,
            self.questions.decode(generated["tokens"]),
            timings,
        )

    async def _within_deadline(self, stage: str, response, calls: list) -> Any:
        """The stage's result, or StageTimeout after args.stage_timeout_s (every call of the request cancelled)."""
        try:
            return await asyncio.wait_for(_awaited(response), self.args.stage_timeout_s)
        except asyncio.TimeoutError:
            for pending in calls:
                pending.cancel()
            raise StageTimeout(stage, self.args.stage_timeout_s) from None

    @api.post("/v1/answer")
    async def answer(self, request: AnswerRequest) -> AnswerResponse:
        try:
            return await self._answer(request)
        except RequestError:
            self.counts["rejected"] += 1
            raise

    @api.post("/v1/answer:batch")
    async def answer_batch(self, batch: Annotated[BatchRequest, Body()]) -> list[AnswerResponse]:
        """At most MAX_BATCH_REQUESTS requests, all checked before any runs; when one fails, the others are
        cancelled (a failed batch leaves no work behind)."""
        limits = await self._limits()
        for request in batch.requests:
            try:
                limits.resolve(request, self.model_num_selected)
            except RequestError as error:
                self.counts["rejected"] += 1
                raise RequestError(f"{error} (every request of a batch must be valid)") from error
        tasks = [asyncio.ensure_future(self._answer(request)) for request in batch.requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    @api.get("/", response_class=HTMLResponse)
    async def demo(self) -> HTMLResponse:
        """The demo page: a question box, the answer, the k retrieved passages with their retrieval and rerank
        scores and which m were kept. It calls POST /v1/answer like any client."""
        return HTMLResponse(self.demo_page)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Each stage ready (healthy, replicas running), degraded (running replicas, but not healthy: starting,
        scaling or replacing one) or down (no running replica); 503 when any stage is down."""
        stages = self._stage_states()
        down = [name for name, state in stages.items() if state == "down"]
        body = {"status": "down" if down else "ok", "stages": stages}
        return JSONResponse(
            status_code=503 if down else 200, content=body, headers={"Retry-After": "5"} if down else None
        )

    @api.get("/v1/metrics")
    async def metrics(self) -> dict[str, Any]:
        """This replica's recent per-stage latencies (ms); Serve's own metrics are on the Prometheus port."""
        summary = {
            stage: {"count": len(v), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}
            for stage, v in self.recent.items()
            if v
        }
        return {"requests": dict(self.counts), "stage_ms": summary}

    async def answer_payload(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The handle API: a request as a dict -> {"status": 200, "body": AnswerResponse dict} or {"status": 4xx/503, "error": ...}."""
        try:
            return {"status": 200, "body": (await self._answer(AnswerRequest.model_validate(payload))).model_dump()}
        except ValidationError as error:
            return {
                "status": 422,
                "error": "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()),
            }
        except RequestError as error:
            return {"status": 400, "error": str(error)}
        except UNAVAILABLE as error:
            return {
                "status": 503,
                "error": f"a serving stage is overloaded or restarting ({type(error).__name__}); retry",
            }


# ---- The builder ---------------------------------------------------------------------------------


def build_app(args: dict[str, Any]) -> serve.Application:
    """The typed builder `serve run` / `serve deploy` call with the config's `args`."""
    app_args = AppArgs.model_validate(args).resolved()
    options = stage_options(app_args)
    batching = {"max_batch_size": app_args.max_batch_size, "batch_wait_timeout_s": app_args.batch_wait_timeout_s}
    placement = {"device": app_args.device, "dtype": app_args.dtype}
    if app_args.fused_stages:  # the Ingress runs the stages itself
        return Ingress.options(**options["Ingress"]).bind(
            None, None, None, None, app_args.model_dir, app_args.model_dump()
        )
    retriever = Retriever.options(**options["Retriever"]).bind(
        app_args.index_dir, app_args.passages, app_args.encoder_path, **batching
    )
    memory_cache = MemoryCache.options(**options["MemoryCache"]).bind(
        app_args.memory_store, app_args.cache_bytes, app_args.verify_memory
    )
    live = LiveEncoderReranker.options(**options["LiveEncoderReranker"]).bind(
        app_args.model_dir, app_args.memory_store, **batching, **placement
    )
    decoder = Decoder.options(**options["Decoder"]).bind(app_args.model_dir, **batching, **placement)
    return Ingress.options(**options["Ingress"]).bind(
        retriever, memory_cache, live, decoder, app_args.model_dir, app_args.model_dump()
    )


# The app with default args (quickstart paths), for `serve build serve_app.app:app` and `serve run serve_app.app:app`.
app = build_app({})
