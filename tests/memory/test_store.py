"""The memory store end to end on a real local Ray cluster: build with the actor pool, read back by id,
the reader's output from stored memory against its output from tokens, kill-and-resume, incremental
add, wrong-encoder refusal, corruption detection, the LRU cache and the streaming read."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from glimmer_ray.data import synthkilt
from glimmer_ray.data.reading import ReadingConfig, passage_text, save_reading
from glimmer_ray.data.tokenizer import save_tokenizer, train_t5_tokenizer
from glimmer_ray.memory import store as store_module
from glimmer_ray.memory.build import build_memory, memory_dataset
from glimmer_ray.memory.codecs import make_codec
from glimmer_ray.memory.store import (
    BATCH_CRC32,
    LRUMemoryCache,
    MemoryEncoderMismatch,
    MemoryStore,
    MemoryStoreError,
    encode_shard,
    write_shard,
)
from glimmer_ray.model.modeling import GlimmerForConditionalGeneration
from glimmer_ray.model.random_t5 import random_t5, t5_1_1_config
from glimmer_ray.retrieval.passages import write_passages
from glimmer_ray.serving import MemoryLookup

pytestmark = pytest.mark.ray
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LP = 40  # passage tokens
K, M = 4, 2


def _reader(directory, vocab_size: int, seed: int) -> str:
    t5 = random_t5(
        t5_1_1_config(vocab_size=vocab_size, d_model=32, num_layers=4, num_heads=4, dropout_rate=0.0), seed=seed
    )
    model = GlimmerForConditionalGeneration.from_t5(t5, live_proportion=0.5, rerank_proportion=0.5, num_selected=M)
    model.save_pretrained(directory)
    save_reading(str(directory), ReadingConfig(24, LP, 6, K, tuple(synthkilt.TASKS)))  # what the build job reads back
    return str(directory)


@pytest.fixture(scope="module")
def artifacts(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    synthkilt.generate(root / "data", "tiny", seed=2)
    passages = str(root / "passages.parquet")
    write_passages(str(root / "data" / "knowledge.jsonl"), passages, max_words=200)
    table = pq.read_table(passages)
    tokenizer = train_t5_tokenizer(
        (passage_text(t, x) for t, x in zip(table["title"].to_pylist(), table["text"].to_pylist())), vocab_size=500
    )
    save_tokenizer(tokenizer, root / "tokenizer")
    vocab = len(AutoTokenizer.from_pretrained(str(root / "tokenizer")))
    return {
        "root": root,
        "passages": passages,
        "tokenizer": str(root / "tokenizer"),
        "model": _reader(root / "model", vocab, 0),
        "other_model": _reader(root / "other_model", vocab, 1),
        "ids": sorted(table["passage_id"].to_pylist()),
        "table": table,
    }


def _build(artifacts, store, codec="fp32", passages=None, **options):
    return build_memory(
        passages or artifacts["passages"],
        str(store),
        artifacts["model"],
        artifacts["tokenizer"],
        LP,
        codec=codec,
        shard_size=options.pop("shard_size", 8),
        batch_size=4,
        progress=False,
        **options,
    )


@pytest.fixture(scope="module")
def fp32_store(artifacts):
    store = artifacts["root"] / "store-fp32"
    report = _build(artifacts, store)
    return store, report


def _stored_ids(store: MemoryStore) -> list[str]:
    return store.passage_ids()


def test_build_stores_every_passage_once_with_its_manifest(artifacts, fp32_store):
    path, report = fp32_store
    store = MemoryStore(str(path), verify="all")
    ids = _stored_ids(store)
    assert sorted(ids) == artifacts["ids"] and len(ids) == len(set(ids))
    manifest = store.manifest
    assert manifest["num_passages"] == len(artifacts["ids"]) == report["passages_encoded"]
    assert manifest["bytes_per_token"] == 4 * 32 and manifest["width"] == 32 and manifest["version"] == 1
    assert manifest["encoder"]["num_memory_layers"] == 2
    for shard in manifest["shards"]:
        assert shard["first_id"] <= shard["last_id"] and shard["num_passages"] <= 8
    assert report["tokens_encoded"] == manifest["num_tokens"] > 0 and report["tokens_per_second"] > 0
    assert not [name for name in os.listdir(path) if ".tmp-" in name]


def _example_batch(artifacts, rng_seed=0):
    """Two questions with K passages each, tokenised as the reader's stream tokenises them."""
    tokenizer = AutoTokenizer.from_pretrained(artifacts["tokenizer"])
    rows = artifacts["table"].to_pylist()
    rng = np.random.default_rng(rng_seed)
    chosen = [[rows[i] for i in rng.choice(len(rows), K, replace=False)] for _ in range(2)]
    keys = [[row["passage_id"] for row in group] for group in chosen]
    texts = [passage_text(row["title"], row["text"]) for group in chosen for row in group]
    passages = tokenizer(texts, max_length=LP, truncation=True, padding="max_length", return_tensors="pt")
    questions = tokenizer(
        ["nq: what is the capital", "tqa: who founded the society"],
        max_length=12,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    labels = tokenizer(
        ["Brandruxkin", "Tedeil"], max_length=6, truncation=True, padding="max_length", return_tensors="pt"
    )
    return {
        "question_ids": questions["input_ids"],
        "question_mask": questions["attention_mask"],
        "passage_ids": passages["input_ids"].view(2, K, LP),
        "passage_mask": passages["attention_mask"].view(2, K, LP),
        "labels": labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100),
    }, keys


def _outputs_from_store(model, store, batch, keys):
    memory, mask = store.fetch([key for group in keys for key in group], length=LP)
    assert np.array_equal(mask.reshape(2, K, LP), batch["passage_mask"].numpy())
    with torch.no_grad():
        from_tokens = model(**batch)
        stored = {k: v for k, v in batch.items() if k != "passage_ids"}
        from_memory = model(**stored, passage_memory=torch.from_numpy(memory).view(2, K, LP, -1))
    return from_tokens, from_memory


def test_reader_output_from_stored_fp32_memory_equals_output_from_tokens(artifacts, fp32_store):
    model = GlimmerForConditionalGeneration.from_pretrained(artifacts["model"]).eval()
    store = MemoryStore(str(fp32_store[0]))
    store.check_model(model, AutoTokenizer.from_pretrained(artifacts["tokenizer"]))
    batch, keys = _example_batch(artifacts)
    from_tokens, from_memory = _outputs_from_store(model, store, batch, keys)
    assert torch.equal(from_tokens.logits, from_memory.logits)
    assert torch.equal(from_tokens.rerank_scores, from_memory.rerank_scores)
    assert torch.equal(from_tokens.selected, from_memory.selected)
    assert torch.equal(from_tokens.loss, from_memory.loss)


# Stated tolerances: max |logit difference| relative to max |logit| from tokens.
CODEC_TOLERANCE = {"bf16": 2e-2, "fp16": 2e-3, "int8": 2e-2, "pq": 0.5}


@pytest.mark.parametrize("codec", sorted(CODEC_TOLERANCE))
def test_reader_output_from_lossy_codecs_stays_within_tolerance(artifacts, codec):
    path = artifacts["root"] / f"store-{codec}"
    _build(artifacts, path, codec=codec, codec_params={"num_subvectors": 8}, shard_size=64)
    model = GlimmerForConditionalGeneration.from_pretrained(artifacts["model"]).eval()
    store = MemoryStore(str(path))
    assert store.manifest["bytes_per_token"] == {"bf16": 64, "fp16": 64, "int8": 36, "pq": 8}[codec]
    batch, keys = _example_batch(artifacts)
    from_tokens, from_memory = _outputs_from_store(model, store, batch, keys)
    error = (from_tokens.logits - from_memory.logits).abs().max() / from_tokens.logits.abs().max()
    assert 0 < error <= CODEC_TOLERANCE[codec]
    for shard in store.manifest["shards"]:  # the bulk scan decodes exactly what random access decodes
        scanned = []
        for ids, counts, memory in store.scan_shard(shard["file"]):
            assert memory.dtype == np.float32 and memory.shape == (counts.sum(), store.width)
            for passage_id, rows in zip(ids, np.split(memory, np.cumsum(counts)[:-1])):
                assert np.array_equal(rows, store.get(passage_id))
                scanned.append(passage_id)
        assert len(scanned) == shard["num_passages"]


def test_memory_encoded_in_bfloat16_stays_within_tolerance_and_is_not_mixed(artifacts, tmp_path):
    # a GPU build runs the memory encoder in bf16 (dtype=bfloat16); the stored memory is the codec's (fp32 here)
    path = tmp_path / "store-bf16-compute"
    _build(artifacts, path, dtype="bfloat16", shard_size=64)
    store = MemoryStore(str(path))
    assert store.manifest["encoder"]["dtype"] == "bfloat16" and store.manifest["codec"] == "fp32"
    model = GlimmerForConditionalGeneration.from_pretrained(artifacts["model"]).eval()
    batch, keys = _example_batch(artifacts)
    from_tokens, from_memory = _outputs_from_store(model, store, batch, keys)
    error = (from_tokens.logits - from_memory.logits).abs().max() / from_tokens.logits.abs().max()
    assert 0 < error <= CODEC_TOLERANCE["bf16"]
    with pytest.raises(ValueError, match="dtype bfloat16.*new shards must match"):
        _build(artifacts, path)  # float32 shards beside bfloat16 ones
    with pytest.raises(ValueError, match="dtype must be one of"):
        _build(artifacts, tmp_path / "never", dtype="int4")
    assert not (tmp_path / "never").exists()


def test_killed_build_resumes_without_duplicates_or_gaps(artifacts, ray_cluster):
    import ray

    path = artifacts["root"] / "store-killed"
    config = [
        f"passages={artifacts['passages']}",
        f"model_dir={artifacts['model']}",
        f"tokenizer_dir={artifacts['tokenizer']}",
        f"store={path}",
        "shard_size=1",
        "batch_size=1",
        "num_cpus_per_actor=0.5",
        f"ray_address={ray.get_runtime_context().gcs_address}",
    ]
    process = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "jobs", "build_memory.py"),
            "--config",
            os.path.join(ROOT, "jobs", "configs", "build_memory.yaml"),
            *config,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (path / "shard-v0001-00002.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (path / "manifest.json").exists(), "the build finished before the kill: nothing to resume"
    finished = sorted(p for p in os.listdir(path) if p.endswith(".json"))
    # a shard that died between its file and its metadata, and a write that died before its rename
    (path / finished[0]).unlink()
    (path / "shard-v0001-00001.arrow.tmp-deadbeef").write_bytes(b"half a shard")

    report = _build(artifacts, path, shard_size=1)
    assert report["shards_reused"] == len(finished) - 1 >= 2
    assert report["shards_written"] == len(artifacts["ids"]) - report["shards_reused"]
    store = MemoryStore(str(path), verify="all")
    ids = _stored_ids(store)
    assert sorted(ids) == artifacts["ids"] and len(ids) == len(set(ids))
    assert not [name for name in os.listdir(path) if ".tmp-" in name]
    reference = MemoryStore(str(artifacts["root"] / "store-fp32"))
    for pid in artifacts["ids"]:
        assert np.array_equal(store.get(pid), reference.get(pid))


def test_incremental_add_writes_only_new_shards(artifacts, tmp_path):
    path = tmp_path / "store"
    first_half = tmp_path / "first.parquet"
    table = artifacts["table"].sort_by("passage_id")
    pq.write_table(table.slice(0, len(table) // 2), first_half)
    _build(artifacts, path, passages=str(first_half))
    before = {name: (path / name).read_bytes() for name in os.listdir(path) if name.endswith(".arrow")}
    report = _build(artifacts, path)
    assert report["version"] == 2 and report["passages_encoded"] == len(table) - len(table) // 2
    assert all((path / name).read_bytes() == payload for name, payload in before.items())
    store = MemoryStore(str(path), verify="all")
    assert sorted(_stored_ids(store)) == artifacts["ids"]
    assert json.loads((path / "manifest-v0001.json").read_text())["num_passages"] == len(table) // 2
    again = _build(artifacts, path)
    assert again["passages_new"] == 0 and MemoryStore(str(path)).manifest["version"] == 2


def test_memory_of_another_encoder_is_refused(artifacts, fp32_store):
    other = GlimmerForConditionalGeneration.from_pretrained(artifacts["other_model"])
    store = MemoryStore(str(fp32_store[0]))
    with pytest.raises(MemoryEncoderMismatch, match="rebuild the memory"):
        store.check_model(other)
    with pytest.raises(MemoryEncoderMismatch, match="another memory encoder"):
        build_memory(
            artifacts["passages"],
            str(fp32_store[0]),
            artifacts["other_model"],
            artifacts["tokenizer"],
            LP,
            progress=False,
        )
    with pytest.raises(ValueError, match="new shards must match"):
        _build(artifacts, fp32_store[0], codec="int8")


def test_corrupt_or_missing_shards_are_reported_by_name(artifacts, fp32_store, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(fp32_store[0], path)
    store = MemoryStore(str(path))
    victim = store.manifest["shards"][1]
    pid = victim["first_id"]
    payload = np.ascontiguousarray(store.get(pid)).tobytes()
    shard_file = path / victim["file"]
    raw = bytearray(shard_file.read_bytes())
    offset = raw.find(payload[:64])
    assert offset >= 0
    raw[offset + 5] ^= 0xFF  # one flipped bit pattern inside the passage's memory, size unchanged
    shard_file.write_bytes(bytes(raw))

    with pytest.raises(MemoryStoreError, match=f"{victim['file']} .* sha256"):
        MemoryStore(str(path), verify="all")
    with pytest.raises(MemoryStoreError, match=f"{victim['file']} .* sha256"):
        MemoryStore(str(path)).get(pid)
    unchecked = MemoryStore(str(path), verify="none")
    with pytest.raises(MemoryStoreError, match=f"passage '{pid}' in shard {victim['file']} .* crc32"):
        unchecked.get(pid)
    with pytest.raises(MemoryStoreError, match=f"passage '{pid}' in shard {victim['file']} .* crc32"):
        list(MemoryStore(str(path), verify="none").scan_shard(victim["file"]))  # the bulk scan checks every row too
    assert np.array_equal(
        unchecked.get(store.manifest["shards"][0]["first_id"]),
        MemoryStore(str(fp32_store[0])).get(store.manifest["shards"][0]["first_id"]),
    )

    shard_file.unlink()
    with pytest.raises(MemoryStoreError, match=f"shard {victim['file']} .* is missing"):
        MemoryStore(str(path))
    with pytest.raises(MemoryStoreError, match="manifest.json is missing"):
        MemoryStore(str(tmp_path / "nowhere"))
    with pytest.raises(KeyError, match="not in the memory store"):
        MemoryStore(str(fp32_store[0])).get("no-such-passage")


def test_a_shard_changed_under_a_running_reader_is_refused_not_a_crash(fp32_store, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(fp32_store[0], path)
    store = MemoryStore(str(path))
    victim = store.manifest["shards"][0]
    pid = victim["first_id"]
    before = store.get(pid)  # the shard is memory-mapped from here on
    shard_file = path / victim["file"]
    shard_file.write_bytes(shard_file.read_bytes()[: victim["bytes"] // 2])  # truncated while mapped
    with pytest.raises(MemoryStoreError, match=f"{victim['file']} .* changed on disk while in use"):
        store.get(pid)  # reading the old mapping past the new end of file would be a SIGBUS
    with pytest.raises(MemoryStoreError, match="corrupt or truncated"):
        MemoryStore(str(path))  # and a new reader refuses the truncated shard
    assert np.array_equal(before, MemoryStore(str(fp32_store[0])).get(pid))


def test_serving_verifies_the_whole_store_before_it_starts(fp32_store, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(fp32_store[0], path)
    victim = MemoryStore(str(path)).manifest["shards"][-1]
    raw = bytearray((path / victim["file"]).read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # size unchanged: only the sha256 can tell
    (path / victim["file"]).write_bytes(bytes(raw))
    with pytest.raises(MemoryStoreError, match=f"{victim['file']} .* sha256"):
        MemoryLookup(str(path), cache_bytes=1 << 20)  # the default: every shard checked at start-up
    MemoryLookup(str(path), cache_bytes=1 << 20, verify="open")  # a huge store: checked as shards are first read


def test_lru_cache_keeps_its_byte_budget_and_returns_stored_memory(artifacts, fp32_store):
    store = MemoryStore(str(fp32_store[0]))
    sizes = {pid: store.get(pid).nbytes for pid in artifacts["ids"][:6]}
    budget = sizes[artifacts["ids"][0]] + sizes[artifacts["ids"][1]] + sizes[artifacts["ids"][2]]
    cache = LRUMemoryCache(store, max_bytes=budget)
    for pid in artifacts["ids"][:3]:
        assert np.array_equal(cache.get(pid), store.get(pid))
    cache.get(artifacts["ids"][0])  # now most recently used
    cache.get(artifacts["ids"][3])  # evicts ids[1] (and more if needed)
    stats = cache.stats()
    assert stats["bytes"] <= budget and stats["hits"] == 1 and stats["misses"] == 4
    cache.get(artifacts["ids"][0])
    assert cache.stats()["hits"] == 2
    memory, mask = cache.fetch(artifacts["ids"][:3], length=LP)
    reference, reference_mask = store.fetch(artifacts["ids"][:3], length=LP)
    assert np.array_equal(memory, reference) and np.array_equal(mask, reference_mask)
    with pytest.raises(ValueError, match="more than the requested length"):
        store.fetch(artifacts["ids"][:3], length=2)


def test_streaming_read_yields_every_passage(artifacts, fp32_store):
    store = MemoryStore(str(fp32_store[0]))
    rows = list(memory_dataset(str(fp32_store[0])).iter_rows())
    assert sorted(row["passage_id"] for row in rows) == artifacts["ids"]
    for row in rows:
        assert np.array_equal(np.asarray(row["memory"]), store.get(row["passage_id"]))
        assert row["num_tokens"] == len(row["memory"])


def test_store_reads_through_a_pyarrow_filesystem(artifacts, fp32_store):
    fsspec = pytest.importorskip("fsspec")
    memory_fs = fsspec.filesystem("memory")
    for name in os.listdir(fp32_store[0]):
        memory_fs.pipe(f"/glimmer-test/{name}", (fp32_store[0] / name).read_bytes())
    remote = MemoryStore("/glimmer-test", filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(memory_fs)), verify="all")
    local = MemoryStore(str(fp32_store[0]))
    for pid in artifacts["ids"][::7]:
        assert np.array_equal(remote.get(pid), local.get(pid))


def test_evaluation_reads_stored_memory_and_refuses_other_tokenisation(artifacts, fp32_store):
    from glimmer_ray.eval.evaluate import predict, stored_memory

    model = GlimmerForConditionalGeneration.from_pretrained(artifacts["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(artifacts["tokenizer"])
    store = MemoryStore(str(fp32_store[0]))
    inputs, keys = _example_batch(artifacts)
    batch = {name: tensor.numpy() for name, tensor in inputs.items()}
    batch.update(
        {
            "id": np.array(["a", "b"]),
            "task": np.array(["nq", "tqa"]),
            "answers": np.array([["x"], ["y"]], dtype=object),
            "gold_pages": np.array(["[]", "[]"]),
            "gold_passages": np.array(["[]", "[]"]),
            "passage_keys": np.array(keys, dtype=object),
            "passage_pages": np.array([[k.split("_")[0] for k in group] for group in keys], dtype=object),
        }
    )
    from_tokens = predict(model, [batch], tokenizer, max_new_tokens=4)
    from_store = predict(model, [batch], tokenizer, max_new_tokens=4, memory=LRUMemoryCache(store, 1 << 20))
    assert from_tokens == from_store
    with pytest.raises(ValueError, match="passage_tokens"):
        stored_memory(store, batch["passage_keys"], inputs["passage_mask"][:, :, : LP // 2])


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_row_checksums_are_zlibs_crc32_so_stores_stay_readable(codec):
    """The stored crc32 is zlib's CRC-32 of (memory bytes, then scales) whatever computes it, so stores written
    before the faster kernel still read and any zlib can check one."""
    import pyarrow as pa

    rng = np.random.default_rng(0)
    memories = [rng.standard_normal((n, 16), dtype=np.float32) for n in (3, 7, 1)]
    table = pa.ipc.open_file(pa.BufferReader(encode_shard(["a", "b", "c"], memories, make_codec(codec, 16)))).read_all()
    for row in range(3):
        data, scales = table.column("data")[row].as_py(), table.column("scales")[row].as_py()
        assert table.column("crc32")[row].as_py() == zlib.crc32(scales, zlib.crc32(data))


def _rewrite_shard(path, index: int, rows, codec, metadata=None) -> dict:
    """Shard `index` of the store at `path` written again from `rows` ((id, memory) pairs), its manifest entry
    updated; `metadata` replaces the schema metadata (b"" keys dropped: a shard written before batch checksums)."""
    manifest = json.loads((path / "manifest.json").read_text())
    name = manifest["shards"][index]["name"]
    meta = write_shard(pafs.LocalFileSystem(), str(path), name, [i for i, _ in rows], [m for _, m in rows], codec, 1)
    if metadata is not None:
        import pyarrow as pa

        table = pa.ipc.open_file(pa.memory_map(str(path / meta["file"]))).read_all()
        table = table.replace_schema_metadata(metadata or None)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=store_module.BATCH_ROWS)
        (path / meta["file"]).write_bytes(sink.getvalue().to_pybytes())
        meta["bytes"] = (path / meta["file"]).stat().st_size
    manifest["shards"][index] = meta
    (path / "manifest.json").write_text(json.dumps(manifest))
    return meta


def test_a_scan_checks_each_record_batch_once_and_still_reads_shards_without_batch_checksums(
    fp32_store, tmp_path, monkeypatch
):
    """A scan checks one crc32 per record batch (zlib's, over the batch's data then scales), reads shards written
    before batch checksums row by row, names the passage whose bytes changed, and refuses a shard whose batch
    checksums do not match its rows."""
    path = tmp_path / "store"
    shutil.copytree(fp32_store[0], path)
    original = MemoryStore(str(path), verify="none")
    shard = original.manifest["shards"][0]
    rows = list(original.read_shard(shard["file"]))
    assert len(rows) >= 5
    monkeypatch.setattr(store_module, "BATCH_ROWS", 2)  # several record batches in one small shard

    def scanned() -> list[tuple[str, np.ndarray]]:
        return list(MemoryStore(str(path), verify="none").read_shard(shard["file"]))

    def same(read) -> bool:
        return [i for i, _ in read] == [i for i, _ in rows] and all(
            np.array_equal(a, b) for (_, a), (_, b) in zip(read, rows)
        )

    meta = _rewrite_shard(path, 0, rows, original.codec)
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(str(path / meta["file"]))).read_all()
    checksums = json.loads(table.schema.metadata[BATCH_CRC32.encode()])
    assert len(checksums) == len(table.to_batches()) == -(-len(rows) // 2)
    for number, batch in enumerate(table.to_batches()):
        data = b"".join(batch.column("data").to_pylist())
        scales = b"".join(batch.column("scales").to_pylist())
        assert checksums[number] == zlib.crc32(scales, zlib.crc32(data))
    assert same(scanned())

    _rewrite_shard(path, 0, rows, original.codec, metadata={})  # a shard from before batch checksums
    assert same(scanned())

    victim = rows[3][0]
    for metadata in (None, {}):  # with batch checksums and without, the scan names the passage whose bytes changed
        _rewrite_shard(path, 0, rows, original.codec, metadata=metadata)
        raw = bytearray((path / meta["file"]).read_bytes())
        raw[raw.find(np.ascontiguousarray(rows[3][1]).tobytes()[:64]) + 5] ^= 0xFF  # size unchanged
        (path / meta["file"]).write_bytes(bytes(raw))
        with pytest.raises(MemoryStoreError, match=f"passage '{victim}' in shard {meta['file']} .* crc32"):
            scanned()

    wrong = [value ^ 1 for value in checksums]
    _rewrite_shard(path, 0, rows, original.codec, metadata={BATCH_CRC32: json.dumps(wrong)})
    with pytest.raises(MemoryStoreError, match="record batch 0 .* batch crc32 .* metadata is corrupt"):
        scanned()
    _rewrite_shard(path, 0, rows, original.codec, metadata={BATCH_CRC32: json.dumps(checksums[:1])})
    with pytest.raises(MemoryStoreError, match="batch checksums: the shard is corrupt"):
        scanned()
