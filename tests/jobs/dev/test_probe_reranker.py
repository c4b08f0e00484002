"""jobs/dev/probe_reranker.py: the scorer alone on cached inputs of a reader, trained on the teacher's ranking,
the gold provenance or the label-free corpus target, with its variants (RMSNorm head, mean pooling, more reranking
layers), against the retriever's recall counted by hand; the probed reader on disk is left untouched."""

from __future__ import annotations

import dataclasses
import json
import os

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from glimmer_ray.data import synthkilt
from glimmer_ray.data.reading import ReadingConfig, save_reading
from glimmer_ray.model import GlimmerForConditionalGeneration

pytestmark = pytest.mark.ray


def test_probe_reranker_job_trains_the_scorer_alone_on_both_targets(quickstart_run, tmp_path, load_job):
    from glimmer_ray.model.random_t5 import save_random_t5, t5_1_1_config

    _, _, root = quickstart_run
    tiny_data = str(root)
    probe = load_job("dev/probe_reranker")
    vocab = len(AutoTokenizer.from_pretrained(os.path.join(tiny_data, "tokenizer")))
    t5_dir = save_random_t5(
        tmp_path / "t5", t5_1_1_config(vocab_size=vocab, d_model=32, num_layers=2, num_heads=2, dropout_rate=0.0)
    )
    reader = GlimmerForConditionalGeneration.from_t5(t5_dir, live_proportion=1.0, rerank_proportion=0.5, num_selected=2)
    reader.save_pretrained(tmp_path / "reader")
    save_reading(str(tmp_path / "reader"), ReadingConfig(24, 48, 6, 4, tuple(synthkilt.TASKS)))  # read as trained
    before = {name: tensor.clone() for name, tensor in reader.state_dict().items()}
    config = probe.ProbeConfig(
        model=str(tmp_path / "reader"),
        data_dir=tiny_data,
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
    save_reading(str(tmp_path / "fid"), ReadingConfig(24, 48, 6, 4, tuple(synthkilt.TASKS)))
    with pytest.raises(SystemExit, match="does not rerank"):
        probe.main(dataclasses.replace(config, model=str(tmp_path / "fid")))
