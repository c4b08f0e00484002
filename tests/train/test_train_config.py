"""The training config refuses settings that cannot run, before any worker starts."""

from __future__ import annotations

import pathlib

import pytest

from glimmer_ray.config import load_config
from glimmer_ray.train.config import TrainConfig, task_paths, tokenize_config, train_paths

RECIPE = pathlib.Path(__file__).resolve().parents[2] / "jobs" / "configs" / "train_quickstart.yaml"


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "optim.rerank_warmup_steps=300",
            "optim.distill_start_step=200",
        ],  # read first, then distil while reading the retriever's top m
        ["optim.rerank_warmup_steps=300", "optim.distill_start_step=300"],
        ["optim.rerank_warmup_steps=0", "optim.distill_start_step=0"],
        [
            "optim.reader_warmup_steps=2000",
            "optim.reader_warmup_passages=1",
            "optim.distill_start_step=2000",
            "optim.rerank_warmup_steps=2150",
        ],
        [
            "optim.reader_warmup_steps=10",
            "optim.reader_warmup_passages=10",
        ],  # all k passages: FiD steps before GLIMMER's
        ["optim.reader_warmup_steps=10", "optim.reader_warmup_source=gold", "data.evidence_passages=1"],
    ],
)
def test_reading_and_distillation_curriculum_is_accepted(overrides):
    load_config(TrainConfig, RECIPE, overrides).validate()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.rerank_warmup_steps=-1"], "rerank_warmup_steps must be >= 0"),
        (["optim.rerank_warmup_steps=100", "optim.distill_start_step=101"], "must distil before it selects"),
        (["optim.distill_start_step=-5", "optim.rerank_warmup_steps=10"], "distill_start_step"),
        (["optim.reader_warmup_steps=-1"], "reader_warmup_steps must be >= 0"),
        (["optim.reader_warmup_passages=0"], "reader_warmup_passages must be between 1 and data.num_passages"),
        (["optim.reader_warmup_passages=11"], "reader_warmup_passages must be between 1 and data.num_passages"),
        (["optim.reader_warmup_source=oracle"], "reader_warmup_source must be 'retrieved' or 'gold'"),
        (["data.evidence_passages=0"], "evidence_passages must be >= 1"),
        (["deepspeed.enabled=false", "scaling.num_workers=2"], "exactly one worker"),
        (["model.num_selected=11"], "exceeds data.num_passages"),
        (["export_max_shard_size=lots"], "export_max_shard_size must be a positive size"),
        (["export_max_shard_size=0GB"], "export_max_shard_size must be a positive size"),
    ],
)
def test_impossible_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(TrainConfig, RECIPE, overrides).validate()


def test_the_stream_tokenises_gold_evidence_only_for_a_gold_reader_warmup():
    gold = load_config(
        TrainConfig,
        RECIPE,
        ["optim.reader_warmup_steps=10", "optim.reader_warmup_source=gold", "data.evidence_passages=2"],
    )
    assert tokenize_config(gold).evidence_passages == 2
    for overrides in (
        ["optim.reader_warmup_steps=10"],
        ["optim.reader_warmup_steps=0", "optim.reader_warmup_source=gold"],
    ):
        assert tokenize_config(load_config(TrainConfig, RECIPE, overrides)).evidence_passages == 0


def test_train_dirs_add_their_training_files_but_not_their_dev_files(tmp_path):
    for directory in ("main", "twin"):
        (tmp_path / directory / "retrieved").mkdir(parents=True)
        for split in ("train", "dev"):
            (tmp_path / directory / "retrieved" / f"nq-{split}.parquet").write_bytes(b"")
    config = load_config(
        TrainConfig,
        RECIPE,
        [f"data.dir={tmp_path / 'main'}", f"data.train_dirs=[{tmp_path / 'twin'}]", "data.tasks=[nq]"],
    )
    assert train_paths(config) == {
        "nq": [str(tmp_path / d / "retrieved" / "nq-train.parquet") for d in ("main", "twin")]
    }
    assert task_paths(config, "dev") == {"nq": str(tmp_path / "main" / "retrieved" / "nq-dev.parquet")}
    (tmp_path / "twin" / "retrieved" / "nq-train.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="twin/retrieved/nq-train.parquet"):
        train_paths(config)
