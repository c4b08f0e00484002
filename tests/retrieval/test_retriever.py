"""The Ray Data pipeline end to end on the tiny benchmark: chunk, embed (actor pool), index, retrieve,
recall, and the tokenised multi-task stream. A real local Ray cluster, the packaged MiniLM encoder."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from glimmer_ray.data import synthkilt
from glimmer_ray.data.kilt import read_knowledge_source
from glimmer_ray.data.reading import passage_text
from glimmer_ray.data.stream import TokenizeBatch, TokenizeConfig, mixed_task_dataset, tokenized_dataset
from glimmer_ray.data.tokenizer import save_tokenizer, train_t5_tokenizer
from glimmer_ray.eval.metrics import covers_evidence, covers_passages, passage_recall
from glimmer_ray.retrieval.index import DenseEncoder, IndexConfig, PassageIndex, build_passage_index
from glimmer_ray.retrieval.passages import write_passages
from glimmer_ray.retrieval.retriever import example_rows, retrieval_recall, retrieve_examples

pytestmark = pytest.mark.ray
K = 5


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    synthkilt.generate(root / "data", "tiny", seed=1)
    passages = str(root / "passages.parquet")
    stats = write_passages(str(root / "data" / "knowledge.jsonl"), passages, max_words=200)
    index_stats = build_passage_index(
        passages, str(root / "index"), IndexConfig(type="flat", use_gpu=False), batch_size=32
    )
    rows = [
        row
        for task in synthkilt.TASKS
        for split in ("train", "dev")
        for row in example_rows(str(root / "data" / f"{task}-{split}-kilt.jsonl"), task, split)
    ]
    retrieval = retrieve_examples(rows, str(root / "index"), passages, str(root / "retrieved"), K, batch_size=32)
    pages, _ = read_knowledge_source(root / "data" / "knowledge.jsonl")
    tokenizer = train_t5_tokenizer((" ".join(p["text"]) for p in pages), vocab_size=600)
    save_tokenizer(tokenizer, root / "tokenizer")
    return root, stats, index_stats, retrieval


def test_index_covers_every_passage(prepared):
    root, stats, index_stats, _ = prepared
    assert index_stats["passages"] == stats["passages"] == pq.read_metadata(root / "passages.parquet").num_rows
    index = PassageIndex.load(root / "index", use_gpu=False)
    assert sorted(index.passage_ids) == sorted(pq.read_table(root / "passages.parquet")["passage_id"].to_pylist())


def test_pipeline_retrieval_equals_direct_search(prepared):
    root, _, _, retrieval = prepared
    assert set(retrieval["files"]) == {f"{t}-{s}" for t in synthkilt.TASKS for s in ("train", "dev")}
    table = pq.read_table(root / "retrieved" / "tqa-dev.parquet").to_pydict()
    index = PassageIndex.load(root / "index", use_gpu=False)
    scores, ids = index.search(DenseEncoder().encode(table["input"][:8]), K)
    assert [list(row) for row in table["passage_ids"][:8]] == ids
    np.testing.assert_allclose(np.array([list(r) for r in table["passage_scores"][:8]]), scores, rtol=1e-5)
    assert all(len(row) == K for row in table["passage_texts"])
    for task in synthkilt.TASKS:  # every retrieved file keeps its KILT file's order (Ray Data's actor pool does not)
        for split in ("train", "dev"):
            kilt_ids = [
                row["id"] for row in example_rows(str(root / "data" / f"{task}-{split}-kilt.jsonl"), task, split)
            ]
            assert (
                pq.read_table(root / "retrieved" / f"{task}-{split}.parquet", columns=["id"])["id"].to_pylist()
                == kilt_ids
            )
    assert "_position" not in table


def test_recall_is_kilt_recall_over_passage_pages(prepared):
    root, _, _, _ = prepared
    path = root / "retrieved" / "hotpotqa-dev.parquet"
    table = pq.read_table(path).to_pydict()
    manual = np.mean(
        [passage_recall(json.loads(p), list(pages), K) for p, pages in zip(table["provenance"], table["passage_pages"])]
    )
    assert retrieval_recall(str(path), (K,))[K] == pytest.approx(manual)
    single_hop = retrieval_recall(str(root / "retrieved" / "nq-dev.parquet"), (1, K))
    assert single_hop[K] >= single_hop[1] > 0.5  # names in the question: dense retrieval finds the page


def test_gold_passages_hold_the_answers_and_rank_like_the_pages(prepared):
    root, _, _, _ = prepared
    passages = {row["passage_id"]: row for row in pq.read_table(root / "passages.parquet").to_pylist()}
    for task in ("nq", "zsre", "hotpotqa"):
        for row in pq.read_table(root / "retrieved" / f"{task}-dev.parquet").to_pylist():
            evidence = json.loads(row["gold_passages"])
            assert len(evidence) == 1 and all(holders for holders in evidence[0])
            pages = json.loads(row["provenance"])[0]
            assert {passages[p]["wikipedia_id"] for holders in evidence[0] for p in holders} == set(pages)
            if task != "hotpotqa":  # one-hop: the answer is written in the gold passage (two-hop: in the second page's)
                assert any(row["answers"][0] in passages[p]["text"] for p in evidence[0][0])
            # the gold-evidence warm-up reads one holder of each item, titled as the retrieved passages are
            assert row["gold_ids"] == [holders[0] for holders in evidence[0]]
            assert row["gold_page_ids"] == [passages[holders[0]]["wikipedia_id"] for holders in evidence[0]]
            assert row["gold_texts"] == [passages[holders[0]]["text"] for holders in evidence[0]]
            assert row["gold_titles"] == [passages[holders[0]]["title"] for holders in evidence[0]]
            # a passage-level hit implies a page-level hit
            kept = row["passage_ids"][:2]
            assert not covers_passages(evidence, kept) or covers_evidence(
                [pages], [passages[p]["wikipedia_id"] for p in kept]
            )
        path = str(root / "retrieved" / f"{task}-dev.parquet")
        table = pq.read_table(path).to_pydict()
        manual = np.mean(
            [
                covers_passages(json.loads(g), list(ids)[:2])
                for g, ids in zip(table["gold_passages"], table["passage_ids"])
            ]
        )
        by_passage, by_page = retrieval_recall(path, (2, K), level="passage"), retrieval_recall(path, (2, K))
        assert by_passage[2] == pytest.approx(manual)
        first = np.mean(
            [
                covers_passages(json.loads(g), list(ids)[:2])
                for g, ids in zip(table["gold_passages"][:3], table["passage_ids"][:3])
            ]
        )
        assert retrieval_recall(path, (2,), level="passage", limit=3)[2] == pytest.approx(
            first
        )  # jobs/evaluate.py's dev limit
        assert by_passage[2] <= by_page[2] and by_passage[K] <= by_page[K]


def test_tasks_are_mixed_uniformly(prepared, tmp_path):
    root, _, _, _ = prepared
    paths = {task: str(root / "retrieved" / f"{task}-train.parquet") for task in ("nq", "fever")}
    small = {"nq": paths["nq"], "fever": str(root / "retrieved" / "fever-dev.parquet")}  # 60 vs 20 rows
    counts = Counter(mixed_task_dataset(small, seed=0).to_pandas()["task"])
    assert counts == {"nq": 60, "fever": 60}
    counts = Counter(mixed_task_dataset(paths, rows_per_task=25, seed=0).to_pandas()["task"])
    assert counts == {"nq": 25, "fever": 25}
    copy = shutil.copy(
        paths["nq"], tmp_path / "nq-train.parquet"
    )  # a twin's file (data.train_dirs): same rows, another file
    twice = {"nq": [paths["nq"], str(copy)], "fever": small["fever"]}  # several files of a task count as one
    counts = Counter(mixed_task_dataset(twice, seed=0).to_pandas()["task"])
    assert counts == {"nq": 120, "fever": 120}


def test_every_epoch_streams_the_same_order_materialised_or_not(prepared):
    # a resumed run finds its data position by skipping the batches it consumed: that needs this order,
    # re-executed each epoch or read back from the object store (the train job's data.cache)
    root, _, _, _ = prepared
    paths = {task: str(root / "retrieved" / f"{task}-train.parquet") for task in ("nq", "fever")}
    dataset = mixed_task_dataset(paths, rows_per_task=25, seed=0)
    first = dataset.to_pandas()["id"].tolist()
    assert dataset.to_pandas()["id"].tolist() == first and dataset.materialize().to_pandas()["id"].tolist() == first
    assert mixed_task_dataset(paths, rows_per_task=25, seed=1).to_pandas()["id"].tolist() != first


def test_tokenized_stream_has_fixed_shapes(prepared):
    root, _, _, _ = prepared
    config = TokenizeConfig(question_tokens=24, passage_tokens=64, answer_tokens=8, num_passages=K, evidence_passages=2)
    paths = {task: str(root / "retrieved" / f"{task}-dev.parquet") for task in synthkilt.TASKS}
    stream = tokenized_dataset(paths, str(root / "tokenizer"), config, rows_per_task=4, batch_size=8)
    batch = next(iter(stream.iter_batches(batch_size=12, batch_format="numpy")))
    assert batch["question_ids"].shape == (12, 24) and batch["passage_ids"].shape == (12, K, 64)
    assert batch["labels"].shape == (12, 8) and batch["passage_mask"].sum(-1).min() > 0
    assert batch["evidence_ids"].shape == (12, 2, 64) and batch["evidence_mask"].sum(-1).min() > 0
    for task, evidence in zip(
        batch["task"], batch["evidence_ids"]
    ):  # one-hop evidence is repeated up to g = 2, two-hop is not
        assert (task == "hotpotqa") != bool((evidence[0] == evidence[1]).all())
    assert ((batch["labels"] == -100) | (batch["labels"] >= 0)).all() and (batch["labels"] == 1).any(
        axis=1
    ).all()  # </s> ends every answer
    assert stream.count() == 4 * len(synthkilt.TASKS)


def test_examples_without_evidence_warm_up_on_the_first_retrieved_passages(prepared):
    root, _, _, _ = prepared
    rows = pq.read_table(root / "retrieved" / "nq-dev.parquet").to_pylist()[:3]
    rows[0]["gold_ids"], rows[0]["gold_page_ids"], rows[0]["gold_titles"], rows[0]["gold_texts"] = [], [], [], []
    batch = {key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]}
    tokenize = TokenizeBatch(str(root / "tokenizer"), TokenizeConfig(24, 64, 8, K, evidence_passages=2))
    tokenized = tokenize(batch)
    assert (tokenized["evidence_ids"][0] == tokenized["passage_ids"][0, :2]).all()
    gold, _ = tokenize._encode([passage_text(rows[1]["gold_titles"][0], rows[1]["gold_texts"][0])], 64)
    assert (tokenized["evidence_ids"][1] == gold).all()  # row 1: its gold passage, twice
    assert tokenized["evidence_keys"].tolist()[:2] == [list(rows[0]["passage_ids"][:2]), [rows[1]["gold_ids"][0]] * 2]
    assert tokenized["evidence_pages"].tolist()[:2] == [
        list(rows[0]["passage_pages"][:2]),
        [rows[1]["gold_page_ids"][0]] * 2,
    ]
    assert "evidence_ids" not in TokenizeBatch(str(root / "tokenizer"), TokenizeConfig(24, 64, 8, K))(
        batch
    )  # g = 0: none
    del batch["gold_ids"]
    with pytest.raises(ValueError, match="no 'gold_ids' column"):
        tokenize(batch)
