"""The prepare_data job up to the passages (build_index=false; the index stages are tests/jobs/test_build_index.py's):
the KILT-format files, the tokenizer and the passages are written, a re-run reuses them, KILT's own files are copied
as they are, and settings that do not apply to KILT files are refused."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

TASKS = ["nq", "fever"]


def test_prepare_data_writes_kilt_files_tokenizer_and_passages(tmp_path, load_job):
    job = load_job("prepare_data")
    config = job.PrepareConfig(
        output_dir=str(tmp_path / "prepared"), scale="tiny", tasks=TASKS, max_words=40, build_index=False
    )
    report = job.main(config)
    root = tmp_path / "prepared"
    for task in TASKS:
        for split in ("train", "dev"):
            lines = (root / "data" / f"{task}-{split}-kilt.jsonl").read_text().splitlines()
            assert lines and all({"id", "input", "output"} <= set(json.loads(line)) for line in lines)
    passages = pq.read_table(root / "passages.parquet").to_pylist()
    assert report["passages"]["passages"] == len(passages) and all(len(p["text"].split()) <= 40 for p in passages)
    assert (root / "tokenizer" / "tokenizer.json").exists() and not (root / "index").exists()
    assert json.loads((root / "data_report.json").read_text())["passages"] == report["passages"]

    written = {
        path: path.stat().st_mtime for path in root.rglob("*") if path.is_file() and path.name != "data_report.json"
    }
    again = job.main(config)
    assert "passages" not in again and "generation_seconds" not in again  # every stage reused
    assert {path: path.stat().st_mtime for path in written} == written

    copied = job.main(
        job.PrepareConfig(
            output_dir=str(tmp_path / "kilt"),
            source="kilt",
            kilt_dir=str(root / "data"),
            tasks=TASKS,
            max_words=40,
            build_index=False,
        )
    )
    assert (tmp_path / "kilt" / "data" / "nq-dev-kilt.jsonl").read_text() == (
        root / "data" / "nq-dev-kilt.jsonl"
    ).read_text()
    assert copied["passages"] == report["passages"]
    with pytest.raises(SystemExit, match="needs kilt_dir"):
        job.main(job.PrepareConfig(output_dir=str(tmp_path / "x"), source="kilt", build_index=False))
    with pytest.raises(SystemExit, match="re-deal SynthKILT"):
        job.main(
            job.PrepareConfig(output_dir=str(tmp_path / "y"), source="kilt", kilt_dir=str(root / "data"), facts_seed=1)
        )
    with pytest.raises(SystemExit, match="unknown source"):
        job.main(job.PrepareConfig(output_dir=str(tmp_path / "z"), source="wikipedia", build_index=False))
