"""The Ray Data pipeline end to end on the tiny benchmark: chunk, embed (actor pool), index, retrieve,
recall, and the tokenised multi-task stream. A real local Ray cluster, the packaged MiniLM encoder."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from glimmer_ray.data import synthkilt
from glimmer_ray.data.kilt import read_knowledge_source
from glimmer_ray.data.stream import TokenizeConfig, mixed_task_dataset, tokenized_dataset
from glimmer_ray.data.tokenizer import save_tokenizer, train_t5_tokenizer
from glimmer_ray.retrieval.index import DenseEncoder, IndexConfig, PassageIndex
from glimmer_ray.retrieval.pipeline import (
    build_passage_index,
    example_rows,
    passage_recall,
    retrieval_recall,
    retrieve_examples,
    write_passages,
)

pytestmark = pytest.mark.ray
K = 5



@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    synthkilt.generate(root / "data", "tiny", seed=1)
    passages = str(root / "passages.parquet")
    stats = write_passages(str(root / "data" / "knowledge.jsonl"), passages, max_words=200)
    index_stats = build_passage_index(passages, str(root / "index"), IndexConfig(type="flat", use_gpu=False), batch_size=32)
    rows = [row for task in synthkilt.TASKS for split in ("train", "dev")
            for row in example_rows(str(root / "data" / f"{task}-{split}-kilt.jsonl"), task, split)]
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
            kilt_ids = [row["id"] for row in example_rows(str(root / "data" / f"{task}-{split}-kilt.jsonl"), task, split)]
            assert pq.read_table(root / "retrieved" / f"{task}-{split}.parquet", columns=["id"])["id"].to_pylist() == kilt_ids
    assert "_position" not in table


def test_recall_is_kilt_recall_over_passage_pages(prepared):
    root, _, _, _ = prepared
    path = root / "retrieved" / "hotpotqa-dev.parquet"
    table = pq.read_table(path).to_pydict()
    manual = np.mean([passage_recall(json.loads(p), list(pages), K) for p, pages in zip(table["provenance"], table["passage_pages"])])
    assert retrieval_recall(str(path), (K,))[K] == pytest.approx(manual)
    # hand-worked: the pages of the first two passages complete the evidence set {a, b}
    assert passage_recall([["a", "b"]], ["b", "b", "a", "c"], 2) == 0.0
    assert passage_recall([["a", "b"]], ["b", "b", "a", "c"], 3) == 1.0
    single_hop = retrieval_recall(str(root / "retrieved" / "nq-dev.parquet"), (1, K))
    assert single_hop[K] >= single_hop[1] > 0.5  # names in the question: dense retrieval finds the page


def test_tasks_are_mixed_uniformly(prepared):
    root, _, _, _ = prepared
    paths = {task: str(root / "retrieved" / f"{task}-train.parquet") for task in ("nq", "fever")}
    small = {"nq": paths["nq"], "fever": str(root / "retrieved" / "fever-dev.parquet")}  # 60 vs 20 rows
    counts = Counter(mixed_task_dataset(small, seed=0).to_pandas()["task"])
    assert counts == {"nq": 60, "fever": 60}
    counts = Counter(mixed_task_dataset(paths, rows_per_task=25, seed=0).to_pandas()["task"])
    assert counts == {"nq": 25, "fever": 25}


def test_tokenized_stream_has_fixed_shapes(prepared):
    root, _, _, _ = prepared
    config = TokenizeConfig(question_tokens=24, passage_tokens=64, answer_tokens=8, num_passages=K)
    paths = {task: str(root / "retrieved" / f"{task}-dev.parquet") for task in synthkilt.TASKS}
    stream = tokenized_dataset(paths, str(root / "tokenizer"), config, rows_per_task=4, batch_size=8)
    batch = next(iter(stream.iter_batches(batch_size=12, batch_format="numpy")))
    assert batch["question_ids"].shape == (12, 24) and batch["passage_ids"].shape == (12, K, 64)
    assert batch["labels"].shape == (12, 8) and batch["passage_mask"].sum(-1).min() > 0
    assert ((batch["labels"] == -100) | (batch["labels"] >= 0)).all() and (batch["labels"] == 1).any(axis=1).all()  # </s> ends every answer
    assert stream.count() == 4 * len(synthkilt.TASKS)
