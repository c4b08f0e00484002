"""The training job on a real local Ray cluster with real DeepSpeed (CPU, gloo, 2 workers): ZeRO-2 (from scratch) and
ZeRO-3 (from a sharded T5 checkpoint, built partitioned) runs lower the loss and export a loadable model with its
reading.json; a ZeRO-3 worker killed mid-run resumes from the last checkpoint and the run completes; workers that
would starve the data stream are refused."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoTokenizer

from glimmer_ray.config import load_config
from glimmer_ray.data.reading import ReadingConfig, load_reading
from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.model.random_t5 import random_t5, t5_1_1_config
from glimmer_ray.retrieval.index import IndexConfig
from glimmer_ray.train.config import TrainConfig

pytestmark = pytest.mark.ray
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "jobs", "configs", "train_quickstart.yaml")


@pytest.fixture(scope="module")
def tiny_data(ray_cluster, tmp_path_factory, load_job):
    prepare = load_job("prepare_data")
    root = tmp_path_factory.mktemp("train_data")
    config = prepare.PrepareConfig(
        output_dir=str(root),
        scale="tiny",
        num_passages=4,
        recall_ks=[1, 4],
        tokenizer_vocab_size=600,
        index=IndexConfig(use_gpu=False),
    )
    prepare.main(config)
    return str(root)


@pytest.fixture(scope="module")
def sharded_t5(tiny_data, tmp_path_factory) -> str:
    """A tiny T5.1.1 checkpoint over the data's tokenizer, sharded as Hugging Face writes large models."""
    vocab_size = len(AutoTokenizer.from_pretrained(os.path.join(tiny_data, "tokenizer")))
    directory = tmp_path_factory.mktemp("t5")
    t5 = random_t5(t5_1_1_config(vocab_size=vocab_size, d_model=32, num_layers=2, num_heads=2), seed=1)
    t5.save_pretrained(directory, max_shard_size="40KB")
    return str(directory)


def _overrides(data_dir: str, run_dir: str, name: str, **overrides) -> list[str]:
    base = [
        f"data.dir={data_dir}",
        "data.cache=false",
        "data.num_passages=4",
        "data.question_tokens=24",
        "data.passage_tokens=48",
        "data.answer_tokens=6",
        "data.dev_limit_per_task=4",
        "model.checkpoint=null",
        "model.d_model=32",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.num_selected=2",
        "model.live_proportion=0.5",
        "model.rerank_proportion=0.5",
        "optim.batch_size=4",
        "optim.learning_rate=0.003",
        "optim.warmup_steps=0",
        "scaling.num_workers=2",
        "scaling.resources_per_worker={CPU: 0.5}",
        f"checkpoint.storage_path={run_dir}",
        f"checkpoint.name={name}",
        "checkpoint.every_steps=4",
        "log.every_steps=2",
        "log.tensorboard=false",
        f"export_dir={os.path.join(run_dir, name + '-export')}",
    ]
    return base + [f"{key}={value}" for key, value in overrides.items()]


def _train_config(data_dir: str, run_dir: str, name: str, **overrides) -> TrainConfig:
    return load_config(TrainConfig, QUICKSTART, _overrides(data_dir, run_dir, name, **overrides))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_runs_lower_the_loss_and_export_a_working_model(tiny_data, sharded_t5, tmp_path, load_job, stage):
    train = load_job("train")
    # with the curriculum: read the retriever's first passage (ZeRO-3: the gold evidence passages), then its top m
    # without distillation, then distil, then select by the reranker
    # data.cache (materialising the stream at start-up) costs ~30 s here, so only the ZeRO-2 run keeps it
    config = _train_config(
        tiny_data,
        str(tmp_path),
        f"zero{stage}",
        **{
            "deepspeed.zero_stage": stage,
            "optim.max_steps": 8,
            "data.cache": "true" if stage == 2 else "false",
            "optim.reader_warmup_steps": 1,
            "optim.distill_start_step": 2,
            "optim.rerank_warmup_steps": 4,
            "optim.reader_warmup_source": "gold" if stage == 3 else "retrieved",
            # ZeRO-2: the scorer with the retrieval prior, distillation behind the teacher's gate
            "model.retrieval_prior": "true" if stage == 2 else "false",
            "optim.distill_gate": "true" if stage == 2 else "false",
            # ZeRO-3: from a sharded checkpoint, each rank building and reading only its partition; a sharded export
            "model.checkpoint": sharded_t5 if stage == 3 else "null",
            "export_max_shard_size": "60KB" if stage == 3 else "2GB",
            # ZeRO-2: export the best kept checkpoint, here the earliest (step 4 of 4 and 8), consolidated from its shards
            "checkpoint.export": "best" if stage == 2 else "last",
            "checkpoint.score_attribute": "step" if stage == 2 else "dev_em",
            "checkpoint.score_order": "min" if stage == 2 else "max",
        },
    )
    summary = train.main(config)
    metrics = summary["metrics"]
    assert metrics["step"] == 8 and metrics["resumed_from_step"] == 0
    if stage == 2:
        assert summary["exported_metrics"]["step"] == 4 and summary["exported_checkpoint"] != summary["checkpoint"]
    assert metrics["train_loss"] < metrics["first_loss"]
    # each evaluation also scores the reader on the gold evidence alone (the oracle), per task and on average
    tasks = ("nq", "tqa", "hotpotqa", "fever", "zsre", "trex", "average")
    assert all(0.0 <= metrics[f"gold_em/{task}"] <= 1.0 for task in tasks)
    if stage == 2:  # the last evaluation either found the gate open already or measured teacher and retriever
        gate = metrics.get("gate_teacher_passage_recall")
        assert gate is None or 0.0 <= gate <= 1.0 and 0.0 <= metrics["gate_retriever_passage_recall"] <= 1.0
    shards = sorted(name for name in os.listdir(summary["export_dir"]) if name.endswith(".safetensors"))
    assert shards == ["model.safetensors"] if stage == 2 else len(shards) > 2  # ZeRO-3: gathered into 60 KB shards
    model = GlimmerForConditionalGeneration.from_pretrained(summary["export_dir"]).eval()  # no DeepSpeed needed
    tokenizer = AutoTokenizer.from_pretrained(summary["export_dir"])
    question = tokenizer(["nq: where was someone born"], return_tensors="pt")
    passages = tokenizer(["title: A context: B", "title: C context: D"], padding=True, return_tensors="pt")
    tokens, encoding = model.generate(
        question.input_ids,
        question.attention_mask,
        passages.input_ids[None],
        passages.attention_mask[None],
        max_new_tokens=4,
        retrieval_scores=torch.tensor([[0.5, 0.4]]),
    )
    assert tokens.shape[0] == 1 and encoding.selected.shape == (1, 2)
    assert model.config.retrieval_prior == (stage == 2)
    assert model.config.num_selected == 2 and model.config.live_proportion == 0.5
    # the export says how it was trained: token lengths, k and tasks as configured
    assert load_reading(summary["export_dir"]) == ReadingConfig(
        question_tokens=24,
        passage_tokens=48,
        answer_tokens=6,
        num_passages=4,
        tasks=("nq", "tqa", "hotpotqa", "fever", "zsre", "trex"),
    )


def test_killed_worker_resumes_from_the_last_checkpoint(tiny_data, sharded_t5, tmp_path, load_job):
    train = load_job("train")
    overrides = _overrides(
        tiny_data,
        str(tmp_path),
        "resume",
        **{
            "optim.max_steps": 8,
            "failure.max_failures": 1,
            "failure.fail_at_step": 6,
            "failure.fail_rank": 1,
            "deepspeed.zero_stage": 3,  # the restarted group builds partitioned again, then loads its ZeRO-3 shards
            "model.checkpoint": sharded_t5,
        },
    )
    summary = train.main(load_config(TrainConfig, QUICKSTART, overrides))
    assert os.path.exists(os.path.join(str(tmp_path), "resume", ".fault_injected"))  # the worker did die
    metrics = summary["metrics"]
    assert metrics["step"] == 8
    assert metrics["resumed_from_step"] == 4  # the restarted group loaded step 4's checkpoint, not step 0
    assert os.path.isdir(summary["export_dir"])

    # the export job turns the run's newest checkpoint (step 8) into the same model as the run's own export
    export = load_job("export")
    exported = export.main(
        export.ExportConfig(train_config=QUICKSTART, train_overrides=overrides, export_dir=str(tmp_path / "exported"))
    )
    final = GlimmerForConditionalGeneration.from_pretrained(summary["export_dir"]).state_dict()
    again = GlimmerForConditionalGeneration.from_pretrained(exported).state_dict()
    assert final.keys() == again.keys() and all(torch.equal(final[key], again[key]) for key in final)
    assert load_reading(exported) == load_reading(summary["export_dir"])
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        export.main(export.ExportConfig(train_config=QUICKSTART, train_overrides=overrides, checkpoint=str(tmp_path)))


def test_workers_that_would_starve_the_data_stream_are_refused(tiny_data, tmp_path, load_job):
    train = load_job("train")
    config = _train_config(tiny_data, str(tmp_path), "starved", **{"scaling.resources_per_worker": "{CPU: 1}"})
    with pytest.raises(SystemExit, match="leave less than one for the Ray Data stream"):
        train.main(config)
