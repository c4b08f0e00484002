"""Build a passage-memory store with Ray Data: passages -> tokenise -> memory encoder (actor pool) -> shards.

The passages are sorted by id and cut into shards of `shard_size`; each shard is one item of the
stream, so an actor tokenises it, runs MemEnc over it in batches and writes it atomically (the shard,
then its metadata file). A build that dies leaves complete shards behind; the re-run plans the same
shards and skips those whose metadata is there. Passages already in the store are skipped, so
adding passages writes new shards under a new manifest version and leaves the rest untouched.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from glimmer_ray.cli import check_spare_cpu, write_report
from glimmer_ray.config import to_dict
from glimmer_ray.data.reading import PASSAGE_TEMPLATE, load_reading, tokenize_passages
from glimmer_ray.memory.codecs import CODECS, make_codec
from glimmer_ray.memory.store import (
    FORMAT,
    MANIFEST,
    PQ_CENTROIDS,
    MemoryEncoderMismatch,
    MemoryStore,
    _exists,
    _join,
    memory_encoder_fingerprint,
    read_bytes,
    read_json,
    resolve_filesystem,
    tokenizer_fingerprint,
    write_atomic,
    write_json,
    write_shard,
)
from glimmer_ray.model.modeling import GlimmerForConditionalGeneration
from glimmer_ray.runtime import torch_device, torch_dtype


class MemoryEncoder:
    """Tokenises passages as the reader's data stream does and runs the memory encoder over them."""

    def __init__(
        self,
        model: str | GlimmerForConditionalGeneration,
        tokenizer: str | Any,
        passage_tokens: int,
        batch_size: int = 32,
        device: str | None = None,
        dtype: str = "float32",
    ) -> None:
        """`model` and `tokenizer`: loaded objects or their directories. `device`: null = cuda where there is
        one; `dtype`: the encoder's compute dtype (memory comes out as float32 either way)."""
        self.device = torch_device(device)
        if isinstance(model, str):
            model = GlimmerForConditionalGeneration.from_pretrained(model)
        self.model = model.to(self.device, torch_dtype(dtype)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.passage_tokens, self.batch_size = passage_tokens, batch_size

    @torch.no_grad()
    def encode(self, titles: list[str], texts: list[str]) -> list[np.ndarray]:
        """float32 [n_i, d] memory per passage: its real tokens only (padding is not stored).

        Passages are padded to `passage_tokens` as in training, so the stored vectors are exactly the
        ones the reader computes from token ids."""
        memories = []
        for start in range(0, len(texts), self.batch_size):
            ids, mask = tokenize_passages(
                self.tokenizer,
                titles[start : start + self.batch_size],
                texts[start : start + self.batch_size],
                self.passage_tokens,
            )
            ids, mask = torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)
            memory = self.model.encode_memory(ids, mask).float().cpu().numpy()  # [n, lp, d]
            lengths = mask.sum(1).tolist()
            memories.extend(memory[row, :length] for row, length in enumerate(lengths))
        return memories


class EncodeShards:
    """Ray Data actor: one shard spec in, the shard written, its metadata out."""

    def __init__(
        self,
        store_uri: str,
        model_dir: str,
        tokenizer_dir: str,
        passage_tokens: int,
        codec: str,
        codec_params: dict[str, Any],
        batch_size: int,
        device: str | None,
        dtype: str = "float32",
    ) -> None:
        self.encoder = MemoryEncoder(model_dir, tokenizer_dir, passage_tokens, batch_size, device, dtype)
        self.fs, self.root = resolve_filesystem(store_uri)
        centroids = None
        if codec == "pq":
            centroids = np.load(io.BytesIO(read_bytes(self.fs, _join(self.root, PQ_CENTROIDS))))
        self.codec = make_codec(codec, self.encoder.model.config.d_model, centroids=centroids, **codec_params)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        metas = []
        for name, version, ids, titles, texts in zip(
            batch["name"], batch["version"], batch["passage_ids"], batch["titles"], batch["texts"]
        ):
            start = time.perf_counter()
            memories = self.encoder.encode(list(titles), list(texts))
            encoded = time.perf_counter()
            meta = write_shard(self.fs, self.root, str(name), [str(i) for i in ids], memories, self.codec, int(version))
            meta["encode_seconds"] = encoded - start
            meta["write_seconds"] = time.perf_counter() - encoded
            metas.append(meta)
        return {key: np.array([meta[key] for meta in metas]) for key in metas[0]}


def _read_passages(passages_path: str) -> dict[str, list[str]]:
    table = pq.read_table(passages_path, columns=["passage_id", "title", "text"]).sort_by("passage_id")
    columns = {name: table.column(name).to_pylist() for name in ("passage_id", "title", "text")}
    if len(set(columns["passage_id"])) != len(columns["passage_id"]):
        raise ValueError(f"{passages_path} has duplicate passage ids")
    return columns


def _train_pq(
    fs,
    root: str,
    encoder: MemoryEncoder,
    passages: dict[str, list[str]],
    codec_params: dict[str, Any],
    sample_passages: int,
) -> None:
    """Train the product quantiser on the memory of the first passages and store its codebook."""
    count = min(sample_passages, len(passages["passage_id"]))
    sample = np.concatenate(encoder.encode(passages["title"][:count], passages["text"][:count]))
    codec = make_codec("pq", encoder.model.config.d_model, **codec_params)
    codec.train(sample)
    buffer = io.BytesIO()
    np.save(buffer, codec.centroids())
    write_atomic(fs, _join(root, PQ_CENTROIDS), buffer.getvalue())


def build_memory(
    passages_path: str,
    store_uri: str,
    model_dir: str,
    tokenizer_dir: str,
    passage_tokens: int,
    codec: str = "fp32",
    codec_params: dict[str, Any] | None = None,
    shard_size: int = 1024,
    batch_size: int = 32,
    concurrency: int = 1,
    num_cpus_per_actor: float = 1.0,
    num_gpus_per_actor: float = 0.0,
    pq_train_passages: int = 512,
    progress: bool = True,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Build (or extend, or resume) the memory store at `store_uri` for the passages of `passages_path`.

    Returns a report: passages and tokens encoded now, shards written / reused, throughput."""
    if codec not in CODECS:
        raise ValueError(f"unknown memory codec {codec!r}; choose one of {', '.join(CODECS)}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    torch_dtype(dtype)  # an unknown dtype fails here, before any actor starts
    codec_params = dict(codec_params or {})
    if codec != "pq":
        codec_params = {}
    start = time.perf_counter()
    fs, root = resolve_filesystem(store_uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):
            if ".tmp-" in name:  # a write that died before its rename
                os.remove(os.path.join(root, name))
    model = GlimmerForConditionalGeneration.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fingerprint = memory_encoder_fingerprint(model)
    tokenizer_print = tokenizer_fingerprint(tokenizer)
    passages = _read_passages(passages_path)

    previous = None
    stored: set[str] = set()
    if _exists(fs, _join(root, MANIFEST)):
        store = MemoryStore(store_uri, verify="none")
        previous = store.manifest
        if previous["encoder"]["fingerprint"] != fingerprint:
            raise MemoryEncoderMismatch(
                f"{store_uri} holds memory of another memory encoder ({previous['encoder']['fingerprint'][:12]}, from "
                f"{previous['encoder'].get('model_dir')}); this checkpoint's is {fingerprint[:12]}: write to a new store"
            )
        settings = (
            previous["codec"],
            previous.get("codec_params", {}),
            previous["tokenizer"]["fingerprint"],
            previous["tokenizer"]["passage_tokens"],
            previous["encoder"].get("dtype", "float32"),
        )
        if settings != (codec, codec_params, tokenizer_print, passage_tokens, dtype):
            raise ValueError(
                f"{store_uri} was built with codec {previous['codec']} {previous.get('codec_params', {})}, passage_tokens "
                f"{previous['tokenizer']['passage_tokens']}, dtype {previous['encoder'].get('dtype', 'float32')} and "
                f"another or the same tokenizer; new shards must match: use those settings or a new store"
            )
        stored = set(store.passage_ids())
    version = (previous["version"] + 1) if previous else 1
    new_rows = [row for row, pid in enumerate(passages["passage_id"]) if pid not in stored]
    report: dict[str, Any] = {
        "store": store_uri,
        "version": previous["version"] if previous else 0,
        "passages_total": len(stored),
        "passages_new": len(new_rows),
        "shards_written": 0,
        "shards_reused": 0,
    }
    if not new_rows:
        report["wall_seconds"] = time.perf_counter() - start
        print(
            f"[build_memory] {store_uri} already holds all {len(passages['passage_id'])} passages (version {report['version']})"
        )
        return report

    plans = []
    for number, first in enumerate(range(0, len(new_rows), shard_size)):
        rows = new_rows[first : first + shard_size]
        plans.append(
            {
                "name": f"shard-v{version:04d}-{number:05d}",
                "version": version,
                "passage_ids": [passages["passage_id"][r] for r in rows],
                "titles": [passages["title"][r] for r in rows],
                "texts": [passages["text"][r] for r in rows],
            }
        )
    done, pending = {}, []
    for plan in plans:
        meta_path = _join(root, f"{plan['name']}.json")
        if _exists(fs, meta_path) and _exists(fs, _join(root, f"{plan['name']}.arrow")):
            meta = read_json(fs, meta_path)
            if (meta["first_id"], meta["last_id"], meta["num_passages"]) == (
                plan["passage_ids"][0],
                plan["passage_ids"][-1],
                len(plan["passage_ids"]),
            ):
                done[plan["name"]] = meta
                continue
        pending.append(plan)
    report["shards_reused"] = len(done)

    if codec == "pq" and not _exists(fs, _join(root, PQ_CENTROIDS)):
        _train_pq(
            fs,
            root,
            MemoryEncoder(model_dir, tokenizer_dir, passage_tokens, batch_size, "cpu"),
            passages,
            codec_params,
            pq_train_passages,
        )

    encode_seconds = 0.0
    tokens_now = 0
    if pending:
        dataset = ray.data.from_items(pending, override_num_blocks=len(pending))
        written = dataset.map_batches(
            EncodeShards,
            fn_constructor_kwargs={
                "store_uri": store_uri,
                "model_dir": model_dir,
                "tokenizer_dir": tokenizer_dir,
                "passage_tokens": passage_tokens,
                "codec": codec,
                "codec_params": codec_params,
                "batch_size": batch_size,
                "device": "cuda" if num_gpus_per_actor > 0 else "cpu",
                "dtype": dtype,
            },
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            batch_size=1,
            num_cpus=num_cpus_per_actor,
            num_gpus=num_gpus_per_actor,
            batch_format="numpy",
        )
        encode_start = time.perf_counter()
        with tqdm(
            total=sum(len(p["passage_ids"]) for p in pending), unit="passage", desc="memory", disable=not progress
        ) as bar:
            for meta in written.iter_rows():
                meta = {key: (value.item() if hasattr(value, "item") else value) for key, value in meta.items()}
                encode_seconds += meta.pop("encode_seconds")
                meta.pop("write_seconds")
                done[meta["name"]] = meta
                tokens_now += meta["num_tokens"]
                bar.update(meta["num_passages"])
                bar.set_postfix(tokens_per_s=f"{tokens_now / max(time.perf_counter() - encode_start, 1e-9):.0f}")
        report["stream_seconds"] = time.perf_counter() - encode_start
        report["shards_written"] = len(pending)

    shards = (previous["shards"] if previous else []) + [done[plan["name"]] for plan in plans]
    manifest = {
        "format": FORMAT,
        "version": version,
        "codec": codec,
        "codec_params": codec_params,
        "dtype": "float32",  # what reads decode to
        "width": model.config.d_model,
        "bytes_per_token": make_codec(codec, model.config.d_model, **codec_params).bytes_per_token(
            model.config.d_model
        ),
        "encoder": {
            "fingerprint": fingerprint,
            "model_dir": os.path.abspath(model_dir) if "://" not in model_dir else model_dir,
            "num_memory_layers": model.config.num_memory_layers,
            "d_model": model.config.d_model,
            "dtype": dtype,  # the encoder's compute dtype
        },
        "tokenizer": {
            "fingerprint": tokenizer_print,
            "dir": tokenizer_dir,
            "passage_tokens": passage_tokens,
            "template": PASSAGE_TEMPLATE,
        },
        "num_passages": sum(s["num_passages"] for s in shards),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
    }
    write_json(fs, _join(root, f"manifest-v{version:04d}.json"), manifest)
    write_json(fs, _join(root, MANIFEST), manifest)
    passages_now = sum(len(p["passage_ids"]) for p in pending)
    report.update(
        {
            "version": version,
            "passages_total": manifest["num_passages"],
            "passages_encoded": passages_now,
            "tokens_encoded": tokens_now,
            "encode_seconds": encode_seconds,  # inside the memory encoder, summed over actors
            "passages_per_second": passages_now / encode_seconds if encode_seconds else None,  # per actor
            "tokens_per_second": tokens_now / encode_seconds if encode_seconds else None,
            "bytes": manifest["bytes"],
            "wall_seconds": time.perf_counter() - start,
        }
    )
    return report


def memory_dataset(store_uri: str) -> ray.data.Dataset:
    """The whole store as a Ray Data stream, one row a passage: passage_id, num_tokens, memory [n, d].

    Each shard is one read task, so shards stream in parallel and only the shard being read is held."""
    store = MemoryStore(store_uri, verify="none")
    items = [{"file": meta["file"]} for meta in store.manifest["shards"]]

    def read_shard(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        reader = MemoryStore(store_uri, verify="none")
        ids, counts, memories = [], [], []
        for file in batch["file"]:
            for batch_ids, batch_counts, memory in reader.scan_shard(str(file)):  # bulk decode, crc32 per row
                ids.extend(batch_ids)
                counts.append(batch_counts)
                memories.extend(np.split(memory, np.cumsum(batch_counts)[:-1]))  # views, no copy
        ragged = np.empty(len(memories), dtype=object)  # ragged: [n_i, d] each
        ragged[:] = memories
        return {
            "passage_id": np.array(ids, dtype=object),
            "num_tokens": np.concatenate(counts),
            "memory": ragged,
        }

    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        read_shard, batch_size=1, batch_format="numpy"
    )


@dataclass
class BuildMemoryConfig:
    passages: str = "outputs/quickstart/passages.parquet"  # jobs/prepare_data.py output
    model_dir: str = "outputs/quickstart/model"  # trained reader (Hugging Face layout)
    tokenizer_dir: str | None = None  # null = the reader's own, exported beside it
    store: str = "outputs/quickstart/memory"  # local directory or s3:// / gs:// URI
    codec: str = "fp32"  # fp32 | bf16 | fp16 | int8 | pq
    pq_subvectors: int = 16  # pq: bytes per token (divides d_model)
    shard_size: int = 1024  # passages per shard
    batch_size: int = 32  # passages per memory-encoder call
    concurrency: int = 1  # encoder actors
    num_cpus_per_actor: float = 1.0  # CPUs per encoder actor
    num_gpus_per_actor: float = 0.0  # GPUs per encoder actor (0: CPU)
    dtype: str = "float32"  # the memory encoder's compute dtype: float32 | bfloat16 | float16 (stored by `codec`)
    report: str | None = None  # JSON report path; null = <store>/build_report.json when local
    ray_address: str | None = None  # null: the cluster of `ray job submit`, else a new local one


def run_build_memory(config: BuildMemoryConfig) -> dict:
    """`build_memory` with the passage length the reader was trained with (its reading.json), in the caller's
    Ray session; writes the report as JSON (`report`, or <store>/build_report.json for a local store)."""
    if config.num_gpus_per_actor == 0:
        check_spare_cpu(
            config.concurrency * config.num_cpus_per_actor,
            f"{config.concurrency} encoder actors x {config.num_cpus_per_actor} CPU",
            "use fewer actors or fewer CPUs each",
        )
    report = build_memory(
        config.passages,
        config.store,
        config.model_dir,
        config.tokenizer_dir or config.model_dir,
        load_reading(config.model_dir).passage_tokens,
        codec=config.codec,
        codec_params={"num_subvectors": config.pq_subvectors},
        shard_size=config.shard_size,
        batch_size=config.batch_size,
        concurrency=config.concurrency,
        num_cpus_per_actor=config.num_cpus_per_actor,
        num_gpus_per_actor=config.num_gpus_per_actor,
        dtype=config.dtype,
    )
    report["config"] = to_dict(config)
    if report.get("passages_encoded"):
        print(
            f"[build_memory] version {report['version']}: {report['passages_encoded']} passages, {report['tokens_encoded']} tokens "
            f"encoded at {report['passages_per_second']:.1f} passages/s, {report['tokens_per_second']:.0f} tokens/s per actor; "
            f"{report['shards_written']} shards written, {report['shards_reused']} reused; store {report['passages_total']} passages, "
            f"{report['bytes'] / 2**20:.2f} MiB; {report['wall_seconds']:.1f} s in all"
        )
    path = config.report or (os.path.join(config.store, "build_report.json") if "://" not in config.store else None)
    if path:
        write_report(path, report)
    return report
