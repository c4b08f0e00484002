"""The build_memory job: memory of every passage from the trained reader, tokenised with the passage length the
reader was trained with (read from its reading.json, not re-declared), equal to what the quickstart stored; a
model directory without reading.json is refused with what is missing."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from glimmer_ray.data.reading import READING_FILE, load_reading
from glimmer_ray.memory.store import MemoryStore

pytestmark = pytest.mark.ray


def test_build_memory_reads_the_passage_length_as_trained(quickstart_run, tmp_path, load_job):
    _, _, root = quickstart_run
    job = load_job("build_memory")
    config = job.BuildMemoryConfig(
        passages=str(root / "passages.parquet"),
        model_dir=str(root / "model"),
        store=str(tmp_path / "memory"),
        codec="bf16",
        shard_size=16,
        num_cpus_per_actor=0.5,
    )
    report = job.main(config)
    passage_ids = pq.read_table(root / "passages.parquet", columns=["passage_id"])["passage_id"].to_pylist()
    assert report["passages_total"] == len(passage_ids) and report["shards_written"] == -(-len(passage_ids) // 16)
    built, stored = MemoryStore(str(tmp_path / "memory")), MemoryStore(str(root / "memory"))
    lp = load_reading(str(root / "model")).passage_tokens
    assert built.manifest["tokenizer"]["passage_tokens"] == lp == stored.manifest["tokenizer"]["passage_tokens"]
    some = passage_ids[:5]
    (bf16, mask), (fp32, same_mask) = built.fetch(some, length=lp), stored.fetch(some, length=lp)
    assert (mask == same_mask).all()  # the same tokens: the reader's own tokenisation, its own tokenizer
    assert abs(bf16 - fp32).max() <= 2**-7 * abs(fp32).max()  # bf16 keeps 8 significant bits

    bare = tmp_path / "bare-model"
    shutil.copytree(root / "model", bare)
    (bare / READING_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="reading.json is missing"):
        job.main(job.BuildMemoryConfig(passages=config.passages, model_dir=str(bare), store=str(tmp_path / "m2")))
