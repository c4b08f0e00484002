"""The passage-memory store: Arrow IPC shards, a versioned manifest, random access and verification.

Layout of a store directory (a local path or a pyarrow filesystem URI such as s3://bucket/memory):

    manifest.json                 the current manifest (also kept as manifest-v<NNNN>.json per version)
    shard-v<V>-<NNNNN>.arrow      Arrow IPC files, one row a passage, memory-mapped when local
    shard-v<V>-<NNNNN>.json       the shard's metadata, written once the shard itself is complete
    pq-centroids.npy              the product quantiser's codebook (codec pq only)

A shard row holds one passage's memory without padding: passage_id, num_tokens, data (the codec's
bytes of the [num_tokens, d] vectors), scales (per-token scales, int8 only) and crc32 (of data and
scales, checked on every random access). The rows are written in record batches of `BATCH_ROWS`, and the
schema's metadata holds one crc32 per batch (of its rows' data, then their scales, `glimmer.batch_crc32`),
which a sequential scan checks with one call per batch; shards without it are scanned row by row.
Shards cover sorted, disjoint passage-id ranges within a version;
the manifest lists each shard's id range, counts, bytes and sha256, and the fingerprint of the
memory encoder that made it, so memory from another checkpoint is refused.

Shapes: n tokens of a passage, d = d_model (the width), L the padded length of a fetched batch.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import json
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from isal.isal_zlib import crc32  # zlib's CRC-32, with ISA-L's folding kernel: 3-4x zlib's speed, GIL released

from glimmer_ray.memory.codecs import Codec, make_codec

FORMAT = "glimmer-memory/1"
BATCH_ROWS = 256  # rows of a shard's record batch, the unit of a scan's checksum
BATCH_CRC32 = "glimmer.batch_crc32"  # schema metadata key: the JSON list of the record batches' crc32s
MANIFEST = "manifest.json"
PQ_CENTROIDS = "pq-centroids.npy"
SHARD_SCHEMA = pa.schema(
    [
        ("passage_id", pa.string()),
        ("num_tokens", pa.int32()),
        ("data", pa.large_binary()),
        ("scales", pa.binary()),
        ("crc32", pa.uint32()),
    ]
)


class MemoryStoreError(RuntimeError):
    """The store is missing, corrupt, or does not belong to the model at hand."""


class MemoryEncoderMismatch(MemoryStoreError):
    """The memory was made by another memory encoder (other weights, split or tokenisation)."""


# ---- Fingerprints ----------------------------------------------------------------------------


def memory_encoder_fingerprint(model) -> str:
    """sha256 over everything the memory depends on: the token embedding, the n_mem memory blocks
    (with block 0's relative-position bias, which every memory block uses), and the split itself."""
    config = model.config
    digest = hashlib.sha256()
    digest.update(json.dumps({"d_model": config.d_model, "num_memory_layers": config.num_memory_layers}).encode())
    tensors = {"shared.weight": model.shared.weight}
    tensors.update(
        {
            f"encoder.block.0.{k}": v
            for k, v in model.encoder.block[0].state_dict().items()
            if "relative_attention_bias" in k
        }
    )
    for index, block in enumerate(model.memory_blocks):
        tensors.update({f"encoder.block.{index}.{k}": v for k, v in block.state_dict().items()})
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary and special tokens (what decides the passage's token ids)."""
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps({"vocab": vocab, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id})
    return hashlib.sha256(payload.encode()).hexdigest()


# ---- Filesystem helpers ----------------------------------------------------------------------


def resolve_filesystem(uri: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI (s3://, gs://, file://)."""
    if filesystem is not None:
        return filesystem, uri
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def write_atomic(fs: pafs.FileSystem, path: str, payload: bytes) -> None:
    """Write `payload` so that `path` either does not exist or holds all of it: a temporary name then
    a rename on local disks; object stores publish an object only when its upload completes."""
    if isinstance(fs, pafs.LocalFileSystem):
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(temporary) as stream:
            stream.write(payload)
        fs.move(temporary, path)
    else:
        with fs.open_output_stream(path) as stream:
            stream.write(payload)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    return json.loads(read_bytes(fs, path))


def write_json(fs: pafs.FileSystem, path: str, payload: dict[str, Any]) -> None:
    write_atomic(fs, path, json.dumps(payload, indent=2, sort_keys=True).encode())


# ---- Writing a shard -------------------------------------------------------------------------


def encode_shard(passage_ids: list[str], memories: list[np.ndarray], codec: Codec) -> bytes:
    """Arrow IPC bytes of one shard: one row per passage, its [n, d] memory in the codec's bytes, in record batches of
    `BATCH_ROWS` rows whose crc32s the schema's metadata holds (`batch_checksum`)."""
    payloads, scales, crcs = [], [], []
    for memory in memories:
        payload, scale = codec.encode(memory)
        payloads.append(payload)
        scales.append(scale)
        crcs.append(crc32(scale, crc32(payload)))
    batches = range(0, len(payloads), BATCH_ROWS)
    checksums = [
        batch_checksum(payloads[start : start + BATCH_ROWS], scales[start : start + BATCH_ROWS]) for start in batches
    ]
    schema = SHARD_SCHEMA.with_metadata({BATCH_CRC32: json.dumps(checksums)})
    table = pa.table(
        {
            "passage_id": pa.array(passage_ids, pa.string()),
            "num_tokens": pa.array([len(m) for m in memories], pa.int32()),
            "data": pa.array(payloads, pa.large_binary()),
            "scales": pa.array(scales, pa.binary()),
            "crc32": pa.array(crcs, pa.uint32()),
        },
        schema=schema,
    )
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(table, max_chunksize=BATCH_ROWS)
    return sink.getvalue()


def batch_checksum(payloads, scales) -> int:
    """crc32 of a record batch's rows: their data bytes one after another, then their scales (a scan checks it over
    the batch's contiguous buffers in two calls)."""
    value = 0
    for payload in payloads:
        value = crc32(payload, value)
    for scale in scales:
        value = crc32(scale, value)
    return value


def write_shard(
    fs: pafs.FileSystem,
    root: str,
    name: str,
    passage_ids: list[str],
    memories: list[np.ndarray],
    codec: Codec,
    version: int,
) -> dict[str, Any]:
    """Write a shard and then its metadata file, both atomically; returns the metadata."""
    payload = encode_shard(passage_ids, memories, codec)
    write_atomic(fs, _join(root, f"{name}.arrow"), payload)
    meta = {
        "name": name,
        "file": f"{name}.arrow",
        "version": version,
        "first_id": passage_ids[0],
        "last_id": passage_ids[-1],
        "num_passages": len(passage_ids),
        "num_tokens": int(sum(len(m) for m in memories)),
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    write_json(fs, _join(root, f"{name}.json"), meta)
    return meta


# ---- Reading ---------------------------------------------------------------------------------


@dataclass
class _Shard:
    meta: dict[str, Any]
    table: pa.Table | None = None
    rows: dict[str, int] | None = None
    stamp: tuple[int, int] | None = None  # (size, mtime_ns) of a local, memory-mapped shard when it was opened


class MemoryStore:
    """Random access to stored passage memory by passage id.

    Shards are opened lazily, memory-mapped on local disks (ranged reads elsewhere), and checked
    against the manifest's sha256 the first time they are opened in a process (`verify="open"`),
    all at once (`"all"`), or not at all (`"none"`; each row's crc32 is still checked on read).
    """

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None, verify: str = "open") -> None:
        if verify not in ("open", "all", "none"):
            raise ValueError(f"verify must be open, all or none, got {verify!r}")
        self.uri = uri
        self.fs, self.root = resolve_filesystem(uri, filesystem)
        manifest_path = _join(self.root, MANIFEST)
        if not _exists(self.fs, manifest_path):
            raise MemoryStoreError(
                f"no memory store at {uri}: {MANIFEST} is missing (build one with jobs/build_memory.py)"
            )
        self.manifest = read_json(self.fs, manifest_path)
        if self.manifest.get("format") != FORMAT:
            raise MemoryStoreError(
                f"{manifest_path} is not a {FORMAT} manifest (format {self.manifest.get('format')!r})"
            )
        self.width = int(self.manifest["width"])
        centroids = None
        if self.manifest["codec"] == "pq":
            centroids = np.load(io.BytesIO(read_bytes(self.fs, _join(self.root, PQ_CENTROIDS))))
        self.codec = make_codec(
            self.manifest["codec"], self.width, centroids=centroids, **self.manifest.get("codec_params", {})
        )
        self.verify_mode = verify
        self._lock = threading.Lock()
        self._shards = [_Shard(meta) for meta in self.manifest["shards"]]
        self._ranges = sorted(
            (meta["first_id"], meta["last_id"], index) for index, meta in enumerate(self.manifest["shards"])
        )
        self._firsts = [first for first, _, _ in self._ranges]
        for shard in self._shards:
            info = self.fs.get_file_info(_join(self.root, shard.meta["file"]))
            if info.type != pafs.FileType.File:
                raise MemoryStoreError(f"shard {shard.meta['file']} of {uri} is missing")
            if info.size != shard.meta["bytes"]:
                raise MemoryStoreError(
                    f"shard {shard.meta['file']} of {uri} has {info.size} bytes, the manifest says {shard.meta['bytes']}: it is corrupt or truncated"
                )
        if verify == "all":
            self.verify()

    # -- facts about the store

    @property
    def num_passages(self) -> int:
        return int(self.manifest["num_passages"])

    @property
    def encoder_fingerprint(self) -> str:
        return self.manifest["encoder"]["fingerprint"]

    def check_model(self, model, tokenizer=None) -> None:
        """Refuse memory that another memory encoder (or tokenizer) made. `model`: the reader, or the
        `memory_encoder_fingerprint` of its saved weights (a reader cast to bfloat16 no longer has them)."""
        expected = model if isinstance(model, str) else memory_encoder_fingerprint(model)
        if expected != self.encoder_fingerprint:
            raise MemoryEncoderMismatch(
                f"the memory store at {self.uri} was built by memory encoder {self.encoder_fingerprint[:12]} "
                f"(from {self.manifest['encoder'].get('model_dir')}), but this model's memory encoder is {expected[:12]}: "
                "rebuild the memory with jobs/build_memory.py for this checkpoint"
            )
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.manifest["tokenizer"]["fingerprint"]:
            raise MemoryEncoderMismatch(
                f"the memory store at {self.uri} was tokenised with another tokenizer ({self.manifest['tokenizer'].get('dir')}); rebuild it"
            )

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest; the first mismatch raises, naming the shard."""
        for shard in self._shards:
            self._verify_shard(shard)

    def _verify_shard(self, shard: _Shard) -> None:
        digest = hashlib.sha256()
        with self.fs.open_input_stream(_join(self.root, shard.meta["file"])) as stream:
            while chunk := stream.read(1 << 22):
                digest.update(chunk)
        if digest.hexdigest() != shard.meta["sha256"]:
            raise MemoryStoreError(
                f"shard {shard.meta['file']} of {self.uri} fails its sha256 check: it is corrupt; rebuild it"
            )

    # -- access

    def _open(self, index: int) -> _Shard:
        shard = self._shards[index]
        if shard.table is None:
            with self._lock:
                if shard.table is None:
                    if self.verify_mode == "open":
                        self._verify_shard(shard)
                    path = _join(self.root, shard.meta["file"])
                    local = isinstance(self.fs, pafs.LocalFileSystem)
                    if local:
                        status = os.stat(path)
                        shard.stamp = (status.st_size, status.st_mtime_ns)
                    source = pa.memory_map(path) if local else self.fs.open_input_file(path)
                    try:
                        table = pa.ipc.open_file(source).read_all()
                    except pa.ArrowInvalid as error:
                        raise MemoryStoreError(
                            f"shard {shard.meta['file']} of {self.uri} is unreadable: {error}"
                        ) from error
                    shard.table = table  # its id index (rows) is built on the first random access
        return shard

    def _locate(self, passage_id: str) -> tuple[_Shard, int]:
        position = bisect.bisect_right(self._firsts, passage_id)
        for first, last, index in reversed(self._ranges[:position]):
            if first <= passage_id <= last:
                shard = self._open(index)
                row = self._rows(shard).get(passage_id)
                if row is not None:
                    return shard, row
        raise KeyError(f"passage {passage_id!r} is not in the memory store at {self.uri}")

    def _rows(self, shard: _Shard) -> dict[str, int]:
        """The open shard's passage id -> row index (a scan never needs it)."""
        rows = shard.rows
        if rows is None:
            with self._lock:
                if shard.rows is None:
                    ids = shard.table.column("passage_id").to_pylist()
                    shard.rows = {pid: row for row, pid in enumerate(ids)}
                rows = shard.rows
        return rows

    def passage_ids(self) -> list[str]:
        """Every stored passage id, in manifest (shard) order."""
        return [pid for _, table in self.iter_shards() for pid in table.column("passage_id").to_pylist()]

    def _check_unchanged(self, shard: _Shard) -> None:
        """A memory-mapped shard whose file changed since it was opened is refused, and its mapping dropped:
        reading a truncated mapping would kill the process (SIGBUS)."""
        if shard.stamp is None:
            return
        try:
            status = os.stat(_join(self.root, shard.meta["file"]))
            now = (status.st_size, status.st_mtime_ns)
        except FileNotFoundError:
            now = None
        if now != shard.stamp:
            with self._lock:
                shard.table, shard.rows, shard.stamp = None, None, None
            raise MemoryStoreError(
                f"shard {shard.meta['file']} of {self.uri} changed on disk while in use (size or time): a store must "
                "not be rewritten under a running reader; rebuild it to a new directory"
            )

    def get(self, passage_id: str) -> np.ndarray:
        """The memory of one passage, float32 [n, d]."""
        shard, row = self._locate(passage_id)
        self._check_unchanged(shard)
        table = shard.table
        payload = table.column("data")[row].as_buffer()
        scales = table.column("scales")[row].as_buffer()
        expected = table.column("crc32")[row].as_py()
        if crc32(scales, crc32(payload)) != expected:
            raise MemoryStoreError(
                f"the memory of passage {passage_id!r} in shard {shard.meta['file']} of {self.uri} fails its crc32: the shard is corrupt"
            )
        return self.codec.decode(payload, scales, self.width)

    def fetch(self, passage_ids: list[str], length: int | None = None, source=None) -> tuple[np.ndarray, np.ndarray]:
        """Batched fetch: memory float32 [n, L, d] (zero-padded) and mask int64 [n, L], L = `length` or
        the longest passage. `source` (e.g. an `LRUMemoryCache`) may stand in for `self.get`."""
        getter = (source or self).get
        return pad_memories([getter(pid) for pid in passage_ids], self.width, length)

    def iter_shards(self):
        """(shard metadata, pyarrow Table) for every shard in manifest order."""
        for index in range(len(self._shards)):
            shard = self._open(index)
            yield shard.meta, shard.table

    def scan_shard(self, file: str) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
        """One shard decoded in bulk, one Arrow record batch at a time: (passage ids, num_tokens int64 [r], memory
        float32 [sum n, d]), the rows' memories consecutive (row i: `np.split(memory, np.cumsum(num_tokens)[:-1])`).

        Every memory byte and each row's length are checked: a record batch's crc32 (`batch_checksum`, two calls
        over its contiguous buffers), or in a shard written without batch checksums each row's crc32, on
        `SCAN_THREADS` threads (ISA-L's crc32 releases the GIL); a batch that fails is checked row by row to name the
        passage. The file's sha256 is the store's `verify` mode's business (at open). Decoding runs once per record
        batch over its contiguous data buffer (zero-copy for fp32: a read-only view of the mapped file, valid while the
        store is open), never once per row."""
        index = next((i for i, shard in enumerate(self._shards) if shard.meta["file"] == file), None)
        if index is None:
            raise MemoryStoreError(f"{file} is not a shard of {self.uri}")
        shard = self._open(index)
        self._check_unchanged(shard)
        batches = shard.table.to_batches()
        checksums = _batch_checksums(shard.table.schema, len(batches), file)
        buffers = [
            (*_binary_buffers(batch.column("data"), np.int64), *_binary_buffers(batch.column("scales"), np.int32))
            for batch in batches
        ]  # (data, its offsets [r + 1], scales, their offsets [r + 1]) per batch
        spans = [(data[at[0] : at[-1]], scales[to[0] : to[-1]]) for data, at, scales, to in buffers]
        # the batches' crc32s run ahead on the scan threads while earlier batches are handed out
        sums = (  # each span is one payload and one block of scales: the batch's contiguous buffers
            [_scan_pool().submit(batch_checksum, [data], [scales]) for data, scales in spans]
            if checksums is not None
            else None
        )
        for number, batch in enumerate(batches):
            data, data_offsets, scales, scale_offsets = buffers[number]
            data_bytes, scale_bytes = spans[number]
            num_tokens = _fixed_width(batch.column("num_tokens"), np.int32).astype(np.int64)
            lengths = np.diff(data_offsets) + np.diff(scale_offsets)  # memory bytes + per-token scales (int8)
            wrong = np.flatnonzero(lengths != num_tokens * self.codec.bytes_per_token(self.width))
            if not len(wrong) and (sums is None or sums[number].result() != checksums[number]):
                wrong = _crc32_mismatches(
                    data, data_offsets, scales, scale_offsets, _fixed_width(batch.column("crc32"), np.uint32)
                )
                if not len(wrong) and checksums is not None:  # every row is intact: the stored checksum is not
                    raise MemoryStoreError(
                        f"record batch {number} of shard {file} of {self.uri} fails its batch crc32 while its rows "
                        "pass theirs: the shard's metadata is corrupt"
                    )
            if len(wrong):
                passage_id = batch.column("passage_id")[int(wrong[0])].as_py()
                raise MemoryStoreError(
                    f"the memory of passage {passage_id!r} in shard {file} of {self.uri} fails its crc32 (or length "
                    "check): the shard is corrupt"
                )
            memory = self.codec.decode(data_bytes, scale_bytes, self.width)
            yield batch.column("passage_id").to_pylist(), num_tokens, memory

    def read_shard(self, file: str):
        """(passage_id, memory [n, d]) for every row of one shard (`scan_shard`: each row's crc32 checked)."""
        for ids, counts, memory in self.scan_shard(file):
            yield from zip(ids, np.split(memory, np.cumsum(counts)[:-1]))


SCAN_THREADS = 2  # threads checking a record batch's rows' crc32s in a scan (shards without batch checksums)


def _batch_checksums(schema: pa.Schema, num_batches: int, file: str) -> list[int] | None:
    """The record batches' crc32s of a shard's schema metadata, or None for a shard written without them."""
    stored = (schema.metadata or {}).get(BATCH_CRC32.encode())
    if stored is None:
        return None
    checksums = json.loads(stored)
    if len(checksums) != num_batches:
        raise MemoryStoreError(
            f"shard {file} holds {num_batches} record batches but {len(checksums)} batch checksums: the shard is corrupt"
        )
    return checksums


def _crc32_mismatches(data, data_offsets, scales, scale_offsets, expected: np.ndarray) -> np.ndarray:
    """Rows whose crc32 of (memory bytes, scales) is not the stored one, checked on `SCAN_THREADS` threads. The loop
    runs over Python ints (numpy scalars cost more than a small row's crc32) and skips the scales' crc32 when the
    codec stores none (crc32 of no bytes keeps the value)."""
    data_at, scales_at, wanted = data_offsets.tolist(), scale_offsets.tolist(), expected.tolist()

    def check(rows: range) -> list[int]:
        if not len(scales):
            return [row for row in rows if crc32(data[data_at[row] : data_at[row + 1]]) != wanted[row]]
        return [
            row
            for row in rows
            if crc32(scales[scales_at[row] : scales_at[row + 1]], crc32(data[data_at[row] : data_at[row + 1]]))
            != wanted[row]
        ]

    rows = len(wanted)
    step = -(-rows // SCAN_THREADS)
    parts = [range(start, min(rows, start + step)) for start in range(0, rows, step)]
    if len(parts) <= 1:
        return np.array(check(range(rows)), dtype=np.int64)
    futures = [_scan_pool().submit(check, part) for part in parts]
    return np.array(sorted(row for future in futures for row in future.result()), dtype=np.int64)


@functools.cache
def _scan_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(SCAN_THREADS, thread_name_prefix="memory-scan")


def _fixed_width(column: pa.Array, dtype) -> np.ndarray:
    """A null-free fixed-width Arrow array as a read-only numpy view of its buffer (`Array.to_numpy` would first import
    pandas, half a second in a fresh process, to check for extension types)."""
    if column.null_count:
        raise MemoryStoreError(f"a stored {column.type} column holds {column.null_count} nulls: the shard is corrupt")
    return np.frombuffer(column.buffers()[1], dtype=dtype)[column.offset : column.offset + len(column)]


def _binary_buffers(column: pa.Array, offset_type) -> tuple[memoryview, np.ndarray]:
    """A (large) binary Arrow array's data buffer and its offsets [r + 1], without copying either."""
    _, offsets, data = column.buffers()
    positions = np.frombuffer(offsets, dtype=offset_type)[column.offset : column.offset + len(column) + 1]
    return (memoryview(data) if data is not None else memoryview(b"")), positions


def pad_memories(memories: list[np.ndarray], width: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-passage memory [n_i, d] into float32 [n, L, d] (zero-padded) and mask int64 [n, L]."""
    longest = max((len(m) for m in memories), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a stored passage has {longest} tokens, more than the requested length {length}")
    batch = np.zeros((len(memories), length, width), dtype=np.float32)  # [n, L, d]
    mask = np.zeros((len(memories), length), dtype=np.int64)  # [n, L]
    for row, memory in enumerate(memories):
        batch[row, : len(memory)] = memory
        mask[row, : len(memory)] = 1
    return batch, mask


class LRUMemoryCache:
    """Decoded passage memory kept in least-recently-used order under a byte budget; thread-safe."""

    def __init__(self, store: MemoryStore, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.store, self.max_bytes = store, max_bytes
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = 0

    def get(self, passage_id: str) -> np.ndarray:
        with self._lock:
            memory = self._entries.get(passage_id)
            if memory is not None:
                self._entries.move_to_end(passage_id)
                self.hits += 1
                return memory
            self.misses += 1
        memory = np.array(self.store.get(passage_id), copy=True)  # own the bytes: the mapped file may be evicted
        with self._lock:
            if memory.nbytes <= self.max_bytes and passage_id not in self._entries:
                self._entries[passage_id] = memory
                self.bytes += memory.nbytes
                while self.bytes > self.max_bytes:
                    _, evicted = self._entries.popitem(last=False)
                    self.bytes -= evicted.nbytes
        return memory

    def fetch(self, passage_ids: list[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.store.fetch(passage_ids, length, source=self)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self.bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
            }
