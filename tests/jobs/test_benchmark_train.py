"""The training step benchmark times the same recipe under each engine, on one worker, and refuses bad settings."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "jobs" / "configs" / "train_quickstart.yaml")


def test_each_engine_runs_the_recipe_on_one_worker(load_job, tmp_path):
    benchmark = load_job("benchmark_train")
    config = benchmark.BenchmarkTrainConfig(
        train_config=RECIPE, overrides=["model.num_selected=2", "optim.batch_size=4"], steps=7, output_dir=str(tmp_path)
    )
    deepspeed, pytorch = (benchmark._run_config(config, engine) for engine in ("deepspeed", "pytorch"))
    assert deepspeed.deepspeed.enabled and not pytorch.deepspeed.enabled
    for engine, run in (("deepspeed", deepspeed), ("pytorch", pytorch)):
        run.validate()
        assert run.scaling.num_workers == 1 and run.optim.max_steps == 7 and run.checkpoint.every_steps == 7
        assert (
            run.model.num_selected == 2 and run.optim.batch_size == 4
        )  # the recipe with its overrides, otherwise untouched
        assert run.export_dir == os.path.join(str(tmp_path), engine, "model")
        assert run.checkpoint.storage_path == os.path.join(str(tmp_path), engine)
    assert deepspeed.model == pytorch.model and deepspeed.optim == pytorch.optim and deepspeed.data == pytorch.data


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"engines": ["deepspeed", "jax"]}, "engines must be"),
        ({"engines": []}, "engines must be"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"overrides": ["optim.no_such_field=1"]}, "no_such_field"),
        ({"overrides": ["model.num_selected=20"]}, "exceeds data.num_passages"),
    ],
)
def test_bad_settings_are_refused_before_any_run(load_job, tmp_path, settings, message):
    benchmark = load_job("benchmark_train")
    config = benchmark.BenchmarkTrainConfig(train_config=RECIPE, output_dir=str(tmp_path), **settings)
    with pytest.raises(SystemExit, match=message):
        benchmark.main(config)
    assert not os.listdir(tmp_path)
