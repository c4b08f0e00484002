"""The training job on a real local Ray cluster with real DeepSpeed (CPU, gloo, 2 workers):
ZeRO-2 and ZeRO-3 runs lower the loss and export a loadable model; a worker killed mid-run
resumes from the last checkpoint and the run completes."""

from __future__ import annotations

import dataclasses
import json
import os

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from glimmer_ray.config import load_config
from glimmer_ray.data.reading import ReadingConfig, load_reading
from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.retrieval.index import IndexConfig
from glimmer_ray.train.config import TrainConfig

pytestmark = pytest.mark.ray
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def _train_config(data_dir: str, run_dir: str, name: str, **overrides) -> TrainConfig:
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
    return load_config(
        TrainConfig,
        os.path.join(ROOT, "jobs", "configs", "train_quickstart.yaml"),
        base + [f"{key}={value}" for key, value in overrides.items()],
    )


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_runs_lower_the_loss_and_export_a_working_model(tiny_data, tmp_path, load_job, stage):
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
        },
    )
    summary = train.main(config)
    metrics = summary["metrics"]
    assert metrics["step"] == 8 and metrics["resumed_from_step"] == 0
    assert metrics["train_loss"] < metrics["first_loss"]
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
    )
    assert tokens.shape[0] == 1 and encoding.selected.shape == (1, 2)
    assert model.config.num_selected == 2 and model.config.live_proportion == 0.5
    # the export says how it was trained: token lengths, k and tasks as configured
    assert load_reading(summary["export_dir"]) == ReadingConfig(
        question_tokens=24,
        passage_tokens=48,
        answer_tokens=6,
        num_passages=4,
        tasks=("nq", "tqa", "hotpotqa", "fever", "zsre", "trex"),
    )


def test_killed_worker_resumes_from_the_last_checkpoint(tiny_data, tmp_path, load_job):
    train = load_job("train")
    config = _train_config(
        tiny_data,
        str(tmp_path),
        "resume",
        **{
            "optim.max_steps": 8,
            "failure.max_failures": 1,
            "failure.fail_at_step": 6,
            "failure.fail_rank": 1,
        },
    )
    summary = train.main(config)
    assert os.path.exists(os.path.join(str(tmp_path), "resume", ".fault_injected"))  # the worker did die
    metrics = summary["metrics"]
    assert metrics["step"] == 8
    assert metrics["resumed_from_step"] == 4  # the restarted group loaded step 4's checkpoint, not step 0
    assert os.path.isdir(summary["export_dir"])


def test_evaluate_job_writes_kilt_predictions_and_scores(tiny_data, tmp_path, load_job):
    train, evaluate = load_job("train"), load_job("evaluate")
    # trained closed-book (the baseline path: one empty passage, m = 1) on one plain-PyTorch worker, evaluated both ways
    summary = train.main(
        _train_config(
            tiny_data,
            str(tmp_path),
            "for-eval",
            **{
                "optim.max_steps": 2,
                "checkpoint.every_steps": 2,
                "model.closed_book": "true",
                "scaling.num_workers": 1,
                "deepspeed.enabled": "false",
            },
        )
    )
    config = evaluate.EvaluateConfig(
        models=[
            evaluate.ModelEntry("glimmer", summary["export_dir"]),
            evaluate.ModelEntry("closed", summary["export_dir"], closed_book=True),
            evaluate.ModelEntry("oracle", summary["export_dir"], reads="gold"),
        ],
        data_dir=tiny_data,
        question_tokens=24,
        passage_tokens=48,
        answer_tokens=6,
        num_passages=4,
        limit_per_task=5,
        output_dir=str(tmp_path / "eval"),
    )
    results = evaluate.main(config)
    for name in ("glimmer", "closed"):
        scores = results["models"][name]["scores"]
        assert set(scores) == {"nq", "tqa", "hotpotqa", "fever", "zsre", "trex", "average"}
        assert scores["nq"]["count"] == 5 and 0.0 <= scores["average"]["em"] <= 1.0
        lines = (tmp_path / "eval" / "predictions" / name / "nq-dev-kilt.jsonl").read_text().splitlines()
        record = json.loads(lines[0])
        assert len(lines) == 5 and set(record) == {"id", "output"} and "answer" in record["output"][0]
    assert results["models"]["closed"]["reranker_recall_at_m"] is None
    assert 0.0 <= results["models"]["glimmer"]["reranker_recall_at_m"] <= 1.0
    # per task: the retriever's own first m against nq's single gold page, the reranker's mean over tasks
    glimmer = results["models"]["glimmer"]
    by_task, m = glimmer["recall_at_m_by_task"], glimmer["num_selected"]
    rows = pq.read_table(os.path.join(tiny_data, "retrieved", "nq-dev.parquet")).to_pylist()[:5]
    assert (
        by_task["nq"]["retriever"] == sum(json.loads(r["provenance"])[0][0] in r["passage_pages"][:m] for r in rows) / 5
    )
    assert sum(t["reranker"] for t in by_task.values()) / 6 == pytest.approx(glimmer["reranker_recall_at_m"])
    assert all(0.0 <= t["teacher"] <= 1.0 for t in by_task.values())  # the distillation teacher's own top m
    assert results["models"]["closed"]["recall_at_m_by_task"]["nq"]["reranker"] is None
    # passage level: the retriever's first passage against the passages holding nq's gold paragraph; never above page level
    passages = glimmer["passage_recall_by_task"]
    assert (
        passages["nq"]["1"]["retriever"]
        == sum(r["passage_ids"][0] in json.loads(r["gold_passages"])[0][0] for r in rows) / 5
    )
    for task, at in passages.items():
        assert (
            at[str(m)]["reranker"] <= by_task[task]["reranker"]
            and at[str(m)]["retriever"] <= by_task[task]["retriever"]
        )
        assert (
            at["1"]["reranker"] <= at[str(m)]["reranker"] and 0.0 <= at["1"]["teacher"] <= at[str(m)]["teacher"] <= 1.0
        )
    assert results["models"]["closed"]["passage_recall_by_task"]["nq"]["1"]["reranker"] is None
    # the oracle reads the g = 2 gold evidence passages alone: its predictions name their pages first, no recall is claimed
    oracle = results["models"]["oracle"]
    assert (
        oracle["num_selected"] == 2 and oracle["reranker_recall_at_m"] is None and oracle["scores"]["nq"]["count"] == 5
    )
    assert (
        oracle["passage_recall_by_task"]["nq"]["1"]["reranker"] is None
        and oracle["recall_at_m_by_task"]["nq"]["teacher"] is None
    )
    assert all(0.0 <= oracle["scores"][task]["em"] <= 1.0 for task in oracle["scores"])
    assert oracle["scores"]["nq"]["rprec"] == 1.0  # nq's one gold page is the page of the passages read
    with pytest.raises(SystemExit, match="reads must be"):
        evaluate.main(
            dataclasses.replace(config, models=[evaluate.ModelEntry("x", summary["export_dir"], reads="oracle")])
        )
    # the dev examples none of whose gold passages is the gold of a training example (of any task), counted by hand for nq
    trained = {
        key
        for task in results["unseen_gold"]
        for ids in pq.read_table(os.path.join(tiny_data, "retrieved", f"{task}-train.parquet"), columns=["gold_ids"])
        .column("gold_ids")
        .to_pylist()
        for key in ids
    }
    assert results["unseen_gold"]["nq"]["passage"] == sum(not set(r["gold_ids"]) & trained for r in rows) / 5
    # the training split: every example's gold is a training gold; predictions are named by the split
    on_train = evaluate.main(dataclasses.replace(config, models=config.models[:1], split="train", teacher_recall=False))
    assert all(share == {"passage": 0.0, "page": 0.0} for share in on_train["unseen_gold"].values())
    assert on_train["models"]["glimmer"]["scores"]["nq"]["count"] == 5
    assert len((tmp_path / "eval" / "predictions" / "glimmer" / "nq-train-kilt.jsonl").read_text().splitlines()) == 5
    with pytest.raises(SystemExit, match="split must be"):
        evaluate.main(dataclasses.replace(config, split="test"))
    with pytest.raises(SystemExit, match="prepare_data.py outputs"):
        evaluate.main(dataclasses.replace(config, train_dirs=[str(tmp_path / "not-prepared")]))
    assert (tmp_path / "eval" / "metrics.json").exists()


def test_workers_that_would_starve_the_data_stream_are_refused(tiny_data, tmp_path, load_job):
    train = load_job("train")
    config = _train_config(tiny_data, str(tmp_path), "starved", **{"scaling.resources_per_worker": "{CPU: 1}"})
    with pytest.raises(SystemExit, match="leave less than one for the Ray Data stream"):
        train.main(config)


def test_probe_reranker_job_trains_the_scorer_alone_on_both_targets(tiny_data, tmp_path, load_job):
    from glimmer_ray.model.random_t5 import save_random_t5, t5_1_1_config

    probe = load_job("dev/probe_reranker")
    vocab = len(AutoTokenizer.from_pretrained(os.path.join(tiny_data, "tokenizer")))
    t5_dir = save_random_t5(
        tmp_path / "t5", t5_1_1_config(vocab_size=vocab, d_model=32, num_layers=2, num_heads=2, dropout_rate=0.0)
    )
    reader = GlimmerForConditionalGeneration.from_t5(t5_dir, live_proportion=1.0, rerank_proportion=0.5, num_selected=2)
    reader.save_pretrained(tmp_path / "reader")
    before = {name: tensor.clone() for name, tensor in reader.state_dict().items()}
    config = probe.ProbeConfig(
        model=str(tmp_path / "reader"),
        data_dir=tiny_data,
        question_tokens=24,
        passage_tokens=48,
        answer_tokens=6,
        num_passages=4,
        train_limit_per_task=8,
        dev_limit_per_task=5,
        steps=30,
        batch_size=4,
        learning_rate=0.01,
        eval_every_steps=10,
        output_dir=str(tmp_path / "probe"),
    )
    metrics = probe.main(config)
    assert json.loads((tmp_path / "probe" / "metrics.json").read_text())["targets"].keys() == {"teacher", "gold"}
    assert metrics["train_examples"] == 48 and metrics["dev_examples"] == 30 and metrics["num_selected"] == 2
    # the retriever's first m against the passages holding nq's gold paragraph, counted by hand
    rows = pq.read_table(os.path.join(tiny_data, "retrieved", "nq-dev.parquet")).to_pylist()[:5]
    by_hand = sum(bool(set(r["passage_ids"][:2]) & set(json.loads(r["gold_passages"])[0][0])) for r in rows) / 5
    assert metrics["dev_reference"]["retriever"]["nq"] == by_hand
    for target in ("teacher", "gold"):
        history = metrics["targets"][target]["history"]
        assert [row["step"] for row in history] == [0, 10, 20, 30]
        assert all(0.0 <= value <= 1.0 for row in history for value in row["dev"].values())
    # both probes start from the reader's own scorer; learning gold provenance on 12 batches lowers its loss
    assert metrics["targets"]["teacher"]["history"][0]["dev"] == metrics["targets"]["gold"]["history"][0]["dev"]
    gold = metrics["targets"]["gold"]["history"]
    assert gold[-1]["loss"] < gold[1]["loss"]
    # the probed reader on disk is untouched
    after = GlimmerForConditionalGeneration.from_pretrained(tmp_path / "reader").state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    with pytest.raises(SystemExit, match="targets must be"):
        probe.main(dataclasses.replace(config, targets=["oracle"]))
    with pytest.raises(SystemExit, match="scoring must be"):
        probe.main(dataclasses.replace(config, scoring="max_pool"))
    # the variant head: mean-pooled scores over RMSNorm-ed states, the norm a trainable copy of the encoder's final one
    head = probe.probe_head(reader, "mean_pool", head_norm=True)
    hidden, mask = torch.randn(3, 5, 32), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + reader.config.layer_norm_epsilon)
    normed = normed * reader.encoder.final_layer_norm.weight
    pooled = torch.stack([normed[row, : int(mask[row].sum())].mean(0) for row in range(3)])
    torch.testing.assert_close(
        head(hidden, mask), pooled @ reader.rerank_head.proj.weight[0] + reader.rerank_head.proj.bias[0]
    )
    assert head.norm.weight is not reader.encoder.final_layer_norm.weight
    with pytest.raises(SystemExit, match="rerank_proportion must be"):
        probe.main(dataclasses.replace(config, rerank_proportion=0.0))
    variant = probe.main(
        dataclasses.replace(
            config,
            targets=["gold", "corpus"],
            steps=10,
            scoring="mean_pool",
            head_norm=True,
            rerank_proportion=1.0,
            output_dir=str(tmp_path / "probe-variant"),
        )
    )
    assert (
        metrics["num_live_a_layers"] == 1 and variant["num_live_a_layers"] == 2
    )  # beta 1: both live layers before the scorer
    for target in ("gold", "corpus"):
        assert [row["step"] for row in variant["targets"][target]["history"]] == [0, 10]
        assert variant["targets"][target]["history"][1]["loss"] > 0
    # the corpus target: a sentence naming a candidate's subject, found in exactly the candidates marked as targets
    assert probe.subject_sentences(
        "title: Kraxbrath context: Historians continue to debate. Kraxbrath is a country whose capital "
        "is Brandruxkin. The official language of Kraxbrath is Souldeirkese."
    ) == ["Kraxbrath is a country whose capital is Brandruxkin", "The official language of Kraxbrath is Souldeirkese."]
    assert probe.subject_sentences("title: Houndmar context: Historians continue to debate. It is a country") == [
        "Historians continue to debate",
        "It is a country",
    ]
    tokenize = probe.TokenizeConfig(24, 48, 6, 4)
    batch = probe.cache_inputs(
        reader,
        [{"nq": os.path.join(tiny_data, "retrieved", "nq-train.parquet")}],
        os.path.join(tiny_data, "tokenizer"),
        tokenize,
        4,
        4,
        "caching",
    )[0]
    rows = pq.read_table(os.path.join(tiny_data, "retrieved", "nq-train.parquet")).to_pylist()[:4]
    queries, used, targets = probe.CorpusQueries(os.path.join(tiny_data, "tokenizer"), 24, seed=0).queries(batch)
    assert used == [0, 1, 2, 3] and targets.shape == (4, 4)
    for query, row, target in zip(queries, used, targets.tolist()):
        sentence = query.removeprefix("nq: ")
        titles, texts = rows[row]["passage_titles"][:4], rows[row]["passage_texts"][:4]
        assert query.startswith("nq: ") and sum(target) >= 1
        assert all(
            sentence in text for text, wanted in zip(texts, target) if wanted
        )  # decoded tokens give back the text
        assert any(title in sentence for title, wanted in zip(titles, target) if wanted)
    no_rerank = GlimmerForConditionalGeneration.from_t5(
        t5_dir, live_proportion=1.0, rerank_proportion=0.5, num_selected=None
    )
    no_rerank.save_pretrained(tmp_path / "fid")
    with pytest.raises(SystemExit, match="does not rerank"):
        probe.main(dataclasses.replace(config, model=str(tmp_path / "fid")))
