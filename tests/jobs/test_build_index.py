"""The build_index job over a prepared directory: finished stages are reused, the recall it reports is the one
prepare_data reported, and a directory that was never prepared is refused with what to run."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def test_build_index_reuses_the_index_and_reports_the_same_recall(quickstart_run, tmp_path, load_job):
    _, summary, root = quickstart_run
    build_index = load_job("build_index")
    index_files = {p.name: p.stat().st_mtime for p in (root / "index").iterdir()}
    report = build_index.main(build_index.BuildIndexConfig(output_dir=str(root), num_passages=25, recall_ks=[5, 4]))
    assert "index" not in report and "retrieval" not in report  # reused, not rebuilt
    assert {p.name: p.stat().st_mtime for p in (root / "index").iterdir()} == index_files
    assert report["dev_recall"] == summary["stages"]["data"]["dev_recall"]
    with pytest.raises(SystemExit, match="not a prepared directory"):
        build_index.main(build_index.BuildIndexConfig(output_dir=str(tmp_path / "empty")))
