"""What the jobs share (glimmer_ray.cli): a Ray session that leaves a caller's connection alone, the refusal of
actor counts that would starve a Ray Data stream, stage reuse and the JSON report."""

from __future__ import annotations

import json

import pytest
import ray

from glimmer_ray.cli import check_spare_cpu, ray_session, run_stage, write_report


@pytest.mark.ray
def test_ray_session_keeps_a_callers_cluster_and_the_cpu_check_refuses_starvation(ray_cluster):
    with ray_session():
        assert ray.is_initialized()
    assert ray.is_initialized()  # the caller's connection (the fixture's 2-CPU cluster) is still there
    check_spare_cpu(1, "one actor", "use fewer")  # leaves one of the two CPUs for the stream
    with pytest.raises(SystemExit, match=r"would take 1.5 of the cluster's 2 CPUs .* use fewer actors"):
        check_spare_cpu(1.5, "3 actors x 0.5 CPU", "use fewer actors")


def test_run_stage_reuses_outputs_unless_overwritten(tmp_path, capsys):
    output = tmp_path / "index"
    assert run_stage("index", str(output), overwrite=False)
    output.mkdir()
    assert not run_stage("index", str(output), overwrite=False)
    assert f"[index] reusing {output}" in capsys.readouterr().out
    assert run_stage("index", str(output), overwrite=True)


def test_write_report_creates_its_folder_and_writes_what_json_cannot_hold_as_text(tmp_path):
    path = write_report(str(tmp_path / "a" / "b" / "report.json"), {"seconds": 1.5, "path": tmp_path})
    assert json.loads(open(path).read()) == {"seconds": 1.5, "path": str(tmp_path)}
