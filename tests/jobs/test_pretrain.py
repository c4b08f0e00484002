"""The pretrain job: text-infilling pre-training as one Ray task on a prepared directory's passages, a checkpoint
GLIMMER loads, reuse of a finished output directory, and a clear error before anything is prepared."""

from __future__ import annotations

import json
import pathlib

import pytest

from glimmer_ray.config import load_config
from glimmer_ray.model import GlimmerForConditionalGeneration

pytestmark = pytest.mark.ray
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_pretrain_job_writes_a_checkpoint_and_reuses_it(quickstart_run, tmp_path, load_job):
    _, _, root = quickstart_run
    job = load_job("pretrain")
    overrides = ["d_model=32", "num_layers=2", "num_heads=2", "steps=4", "batch_size=4", "warmup_steps=2", "num_cpus=1"]
    config = load_config(
        job.PretrainConfig,
        ROOT / "jobs" / "configs" / "pretrain_quickstart.yaml",  # the shipped recipe, made tiny
        [f"data_dir={root}", f"output_dir={tmp_path / 't5'}", *overrides],
    )
    summary = job.main(config)
    assert summary["steps"] == 4 and json.loads((tmp_path / "t5" / "pretrain.json").read_text()) == summary
    reader = GlimmerForConditionalGeneration.from_t5(
        str(tmp_path / "t5"), live_proportion=0.5, rerank_proportion=0.5, num_selected=2
    )
    assert reader.config.d_model == 32
    written = (tmp_path / "t5" / "model.safetensors").stat().st_mtime
    assert job.main(config) == summary and (tmp_path / "t5" / "model.safetensors").stat().st_mtime == written
    with pytest.raises(SystemExit, match="run jobs/prepare_data.py first"):
        job.main(job.PretrainConfig(data_dir=str(tmp_path / "nothing"), output_dir=str(tmp_path / "t5-b")))
