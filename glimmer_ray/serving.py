"""Serving stages of GLIMMER as plain Python, and the in-process pipeline that composes them.

At serving time the reader's work splits into stages of very different cost: dense retrieval (a FAISS
index), memory lookup (bytes, not FLOPs), the live encoder with its reranker (compute over k passages)
and greedy decoding (memory-bandwidth bound). `serve_app` wraps each stage in its own Ray Serve
deployment; `InProcessPipeline` runs the same stages in one process (the reference the Serve graph is
measured against). Payloads between stages are numpy arrays.

Shapes: k retrieved passages, m selected, lq question tokens, lp passage tokens, l = lq + lp, d width.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator
from transformers import AutoTokenizer

from glimmer_ray.data.reading import question_text
from glimmer_ray.memory.store import LRUMemoryCache, MemoryStore, memory_encoder_fingerprint
from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.retrieval.retriever import Retriever
from glimmer_ray.runtime import torch_device, torch_dtype

# ---- The API's types ---------------------------------------------------------------------------


class AnswerRequest(BaseModel):
    """POST /v1/answer. Types are strict: "5" is not a number here."""

    model_config = ConfigDict(extra="forbid")
    question: StrictStr = Field(description="the question, in words")
    task: StrictStr | None = Field(default=None, description="KILT task name; default: the app's default task")
    top_k: StrictInt | None = Field(default=None, description="passages retrieved (k)")
    num_selected: StrictInt | None = Field(default=None, description="passages kept by the reranker (m <= k)")
    max_new_tokens: StrictInt | None = Field(default=None, description="answer length limit, tokens")

    @field_validator("question")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("question is empty")
        return value.strip()


MAX_BATCH_REQUESTS = 32  # requests in one POST /v1/answer:batch; more is a 422


class BatchRequest(BaseModel):
    """POST /v1/answer:batch."""

    model_config = ConfigDict(extra="forbid")
    requests: list[AnswerRequest] = Field(min_length=1, max_length=MAX_BATCH_REQUESTS)


class Passage(BaseModel):
    id: str
    title: str
    text: str
    retrieval_score: float
    rerank_score: float | None
    selected: bool


class AnswerResponse(BaseModel):
    answer: str
    task: str
    top_k: int
    num_selected: int
    passages: list[Passage]
    timings: dict[str, float]  # stage -> milliseconds


class RequestError(ValueError):
    """A request the app cannot answer as asked (HTTP 400 with this message)."""


@dataclass(frozen=True)
class Limits:
    tasks: tuple[str, ...]
    default_task: str
    question_tokens: int  # lq the reader was trained with; longer questions are refused
    default_top_k: int
    max_top_k: int
    default_max_new_tokens: int
    max_new_tokens: int

    def resolve(self, request: AnswerRequest, model_num_selected: int | None) -> tuple[str, int, int, int]:
        """(task, k, m, max_new_tokens) for a request, or a RequestError saying what is out of range."""
        task = request.task if request.task is not None else self.default_task
        if task not in self.tasks:
            raise RequestError(f"unknown task {task!r}; this app serves {', '.join(self.tasks)}")
        k = self.default_top_k if request.top_k is None else request.top_k
        if not 1 <= k <= self.max_top_k:
            raise RequestError(f"top_k must be between 1 and {self.max_top_k}, got {k}")
        m = request.num_selected if request.num_selected is not None else min(model_num_selected or k, k)
        if not 1 <= m <= k:
            raise RequestError(f"num_selected must be between 1 and top_k ({k}), got {m}")
        tokens = self.default_max_new_tokens if request.max_new_tokens is None else request.max_new_tokens
        if not 1 <= tokens <= self.max_new_tokens:
            raise RequestError(f"max_new_tokens must be between 1 and {self.max_new_tokens}, got {tokens}")
        return task, k, m, tokens


# ---- Stages ------------------------------------------------------------------------------------


class QuestionTokenizer:
    """The reader's tokenizer applied to "<task>: <question>", refusing questions over lq tokens."""

    def __init__(self, model_dir: str, question_tokens: int) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.question_tokens = question_tokens

    def __call__(self, task: str, question: str) -> np.ndarray:
        ids = self.tokenizer(question_text(task, question), truncation=False)["input_ids"]
        if len(ids) > self.question_tokens:
            raise RequestError(
                f"the question is {len(ids)} tokens long with its task prefix; the limit is {self.question_tokens}"
            )
        return np.asarray(ids, dtype=np.int64)  # [lq_i]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


class MemoryLookup:
    """Memory of retrieved passages from the store, through an LRU cache: [k, lp, d] and mask [k, lp]."""

    def __init__(self, store_uri: str, cache_bytes: int, verify: str = "all") -> None:
        """`verify`: all = every shard's sha256 now, before serving (a corrupt store never starts); open = each
        shard's when first read (a very large store); rows' crc32 are checked on every read either way."""
        self.store = MemoryStore(store_uri, verify=verify)
        self.cache = LRUMemoryCache(self.store, cache_bytes)
        self.passage_tokens = int(self.store.manifest["tokenizer"]["passage_tokens"])

    def fetch(self, passage_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.cache.fetch(passage_ids, length=self.passage_tokens)


class ReaderStages:
    """The live encoder with its reranker, and the decoder, batched over requests of any k, m, lq."""

    def __init__(self, model_dir: str, device: str = "cpu", dtype: str = "float32") -> None:
        """`device`: cpu | cuda | cuda:N; `dtype`: float32 | bfloat16 | float16, the weights' and activations'
        (stored memory and the encodings passed between stages are cast to it; results come back as float32)."""
        self.device, self.dtype = torch_device(device), torch_dtype(dtype)
        model = GlimmerForConditionalGeneration.from_pretrained(model_dir)  # as saved
        # of the saved weights, before any cast: a memory store built from them matches at every dtype
        self.memory_encoder_fingerprint = memory_encoder_fingerprint(model)
        self.model = model.to(self.device, self.dtype).eval()
        self.eos = self.model.config.eos_token_id

    @torch.no_grad()
    def live(self, requests: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        """Each request: question_ids [lq_i], memory [k, lp, d], memory_mask [k, lp], num_selected m and
        retrieval_scores [k] (the retriever's, read by a scorer with a retrieval prior).
        Returns per request: hidden [m*l, d], mask [m*l], scores [k] (or None), selected [m]."""
        results: list[dict[str, np.ndarray] | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault((request["memory"].shape, request["num_selected"]), []).append(index)
        for (shape, m), members in groups.items():
            length = max(len(requests[i]["question_ids"]) for i in members)
            question_ids = torch.zeros((len(members), length), dtype=torch.long)  # [b, lq]
            question_mask = torch.zeros((len(members), length), dtype=torch.long)
            for row, i in enumerate(members):
                ids = torch.from_numpy(requests[i]["question_ids"])
                question_ids[row, : len(ids)] = ids
                question_mask[row, : len(ids)] = 1
            memory = torch.from_numpy(np.stack([requests[i]["memory"] for i in members])).to(
                self.device, self.dtype
            )  # [b, k, lp, d], as stored (float32 or bfloat16) cast to the reader's dtype
            memory_mask = torch.from_numpy(np.stack([requests[i]["memory_mask"] for i in members])).to(
                self.device
            )  # [b, k, lp]
            num_passages = shape[0]
            retrieval_scores = torch.from_numpy(
                np.stack([np.asarray(requests[i]["retrieval_scores"], dtype=np.float32) for i in members])
            ).to(self.device)  # [b, k]
            encoding = self.model.encode(
                question_ids.to(self.device),
                question_mask.to(self.device),
                passage_mask=memory_mask,
                passage_memory=memory,
                num_selected=m if m < num_passages else None,
                retrieval_scores=retrieval_scores,
            )
            for row, i in enumerate(members):
                results[i] = {
                    "hidden": encoding.hidden[row].float().cpu().numpy(),  # [m*l, d]
                    "mask": encoding.mask[row].cpu().numpy(),  # [m*l]
                    "scores": None
                    if encoding.rerank_scores is None
                    else encoding.rerank_scores[row].float().cpu().numpy(),  # [k]
                    "selected": encoding.selected[row].cpu().numpy(),  # [m]
                }
        return results

    @torch.no_grad()
    def decode(self, requests: list[dict[str, Any]]) -> list[list[int]]:
        """Each request: hidden [n_i, d], mask [n_i], max_new_tokens. Greedy answers as token ids (no EOS)."""
        length = max(len(r["mask"]) for r in requests)
        width = requests[0]["hidden"].shape[-1]
        hidden = torch.zeros((len(requests), length, width))  # [b, n, d], zero-padded
        mask = torch.zeros((len(requests), length), dtype=torch.long)  # [b, n]
        for row, request in enumerate(requests):
            hidden[row, : len(request["mask"])] = torch.from_numpy(request["hidden"])
            mask[row, : len(request["mask"])] = torch.from_numpy(request["mask"])
        steps = max(r["max_new_tokens"] for r in requests)
        tokens = self.model.generate_from_encoding(
            hidden.to(self.device, self.dtype), mask.to(self.device), max_new_tokens=steps
        )[:, 1:]
        answers = []
        for row, request in enumerate(requests):
            out = []
            for token in tokens[row, : request["max_new_tokens"]].tolist():
                if token == self.eos:
                    break
                out.append(token)
            answers.append(out)
        return answers


def assemble_response(
    task: str,
    k: int,
    m: int,
    retrieved: dict[str, list],
    live: dict[str, np.ndarray],
    answer: str,
    timings: dict[str, float],
) -> AnswerResponse:
    selected = set(live["selected"].tolist())
    scores = live["scores"]
    passages = [
        Passage(
            id=pid,
            title=title,
            text=text,
            retrieval_score=score,
            rerank_score=None if scores is None else float(scores[i]),
            selected=i in selected,
        )
        for i, (pid, title, text, score) in enumerate(
            zip(retrieved["ids"], retrieved["titles"], retrieved["texts"], retrieved["scores"])
        )
    ]
    return AnswerResponse(answer=answer, task=task, top_k=k, num_selected=m, passages=passages, timings=timings)


class InProcessPipeline:
    """All stages in this process, one request at a time: the reference for the Serve graph."""

    def __init__(
        self,
        model_dir: str,
        index_dir: str,
        passages: str,
        memory_store: str,
        limits: Limits,
        encoder_path: str | None = None,
        cache_bytes: int = 1 << 30,
        device: str = "cpu",
        dtype: str = "float32",
        verify_memory: str = "all",
    ) -> None:
        self.retriever = Retriever(index_dir, passages, encoder_path, use_gpu=False)
        self.memory = MemoryLookup(memory_store, cache_bytes, verify_memory)
        self.reader = ReaderStages(model_dir, device, dtype)
        self.memory.store.check_model(self.reader.memory_encoder_fingerprint)
        self.questions = QuestionTokenizer(model_dir, limits.question_tokens)
        self.limits = limits

    def answer(self, request: AnswerRequest | dict[str, Any]) -> AnswerResponse:
        request = request if isinstance(request, AnswerRequest) else AnswerRequest.model_validate(request)
        task, k, m, max_new_tokens = self.limits.resolve(request, self.reader.model.config.num_selected)
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        question_ids = self.questions(task, request.question)
        retrieved = self.retriever.search([request.question], k)[0]
        timings["retriever"] = 1e3 * (time.perf_counter() - clock)
        clock = time.perf_counter()
        memory, memory_mask = self.memory.fetch(retrieved["ids"])
        timings["memory"] = 1e3 * (time.perf_counter() - clock)
        clock = time.perf_counter()
        live = self.reader.live(
            [
                {
                    "question_ids": question_ids,
                    "memory": memory,
                    "memory_mask": memory_mask,
                    "num_selected": min(m, len(retrieved["ids"])),
                    "retrieval_scores": retrieved["scores"],
                }
            ]
        )[0]
        timings["live"] = 1e3 * (time.perf_counter() - clock)
        clock = time.perf_counter()
        tokens = self.reader.decode(
            [{"hidden": live["hidden"], "mask": live["mask"], "max_new_tokens": max_new_tokens}]
        )[0]
        timings["decoder"] = 1e3 * (time.perf_counter() - clock)
        timings["total"] = sum(timings.values())
        return assemble_response(task, k, m, retrieved, live, self.questions.decode(tokens), timings)
