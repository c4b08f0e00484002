"""The training step benchmark times the same recipe under each engine, on one worker, and refuses bad settings."""

from __future__ import annotations

import json
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
        ({"engines": [], "distillation": None}, "engines must be"),
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


def test_distillation_comparison_times_one_step_three_ways_and_writes_the_overhead(load_job, tmp_path):
    """engines [] with distillation: no Ray run, only the in-process comparison; the JSON carries
    `distillation_overhead` = distil / reader, and a distilling step is never cheaper than the reader's."""
    benchmark = load_job("benchmark_train")
    timing = benchmark.DistillationTiming(
        d_model=32, num_layers=4, num_heads=2, vocab_size=200, num_passages=6, num_selected=2, batch_size=2,
        question_tokens=8, passage_tokens=12, answer_tokens=4, steps=2, rounds=3,
    )  # fmt: skip
    config = benchmark.BenchmarkTrainConfig(
        train_config=RECIPE, engines=[], steps=1, output_dir=str(tmp_path), distillation=timing
    )
    report = benchmark.main(config)
    written = json.loads((tmp_path / "benchmark_train.json").read_text())
    assert written["distillation_overhead"] == pytest.approx(report["distillation_overhead"])
    rows = written["distillation"]["rows"]
    assert set(rows) == {"reader", "distil", "distil_recompute"}
    for row in rows.values():
        assert len(row["rounds"]) == 3 and row["seconds_per_step"] == sorted(row["rounds"])[1]  # the median round
    assert written["distillation_overhead"] == pytest.approx(
        rows["distil"]["seconds_per_step"] / rows["reader"]["seconds_per_step"]
    )
    assert rows["reader"]["time_over_reader"] == 1.0 and written["results"] == {}

    with pytest.raises(SystemExit, match="num_selected"):
        benchmark.main(
            benchmark.BenchmarkTrainConfig(
                train_config=RECIPE, engines=[], output_dir=str(tmp_path / "bad"),
                distillation=benchmark.DistillationTiming(num_passages=3, num_selected=5),
            )
        )  # fmt: skip
    with pytest.raises(SystemExit, match="engines must be"):
        benchmark.main(benchmark.BenchmarkTrainConfig(engines=[], distillation=None, output_dir=str(tmp_path / "b")))
    assert not (tmp_path / "bad").exists()
