"""Ray Data pipelines: chunk the knowledge source, embed passages in an actor pool, build the FAISS
index, and attach the top-k passages to every example.

The same code scales from the bundled benchmark on a laptop to KILT's Wikipedia on a cluster: chunking
and embedding are `map_batches` stages spread over the cluster (actors keep the encoder loaded), and
the index is built from the streamed embeddings without holding the corpus twice.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from glimmer_ray.data.kilt import (
    chunk_page,
    gold_answers,
    gold_paragraphs,
    gold_passages,
    gold_provenance,
    read_kilt_examples,
    read_knowledge_source,
)
from glimmer_ray.eval.metrics import passage_recall
from glimmer_ray.retrieval.index import (
    DenseEncoder,
    IndexConfig,
    PassageIndex,
    default_encoder_path,
    index_manifest,
    new_faiss_index,
)

PASSAGE_COLUMNS = ("passage_id", "wikipedia_id", "title", "text", "start_paragraph_id", "end_paragraph_id")


def dense_passage_text(title: str, text: str) -> str:
    """What the dense encoder reads for a passage."""
    return f"{title}. {text}"


def write_passages(knowledge_path: str, output_path: str, max_words: int = 200) -> dict[str, Any]:
    """Chunk every page of a KILT knowledge source into passages and write them as Parquet."""
    pages, report = read_knowledge_source(knowledge_path)
    rows = {column: [] for column in PASSAGE_COLUMNS}
    for page in pages:
        for passage in chunk_page(page, max_words):
            for column in PASSAGE_COLUMNS:
                rows[column].append(getattr(passage, column))
    if not rows["passage_id"]:
        raise ValueError(f"{knowledge_path}: no passage could be made (all pages empty)")
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    temporary = f"{output_path}.tmp-{os.getpid()}"
    pq.write_table(pa.table(rows), temporary)
    os.replace(temporary, output_path)
    return {"pages": report.read, "passages": len(rows["passage_id"])}


class EmbedPassages:
    """Ray Data actor: loads the dense encoder once, embeds batches of passages."""

    def __init__(self, encoder_path: str | None, batch_size: int = 64) -> None:
        self.encoder = DenseEncoder(encoder_path, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [dense_passage_text(title, text) for title, text in zip(batch["title"], batch["text"])]
        start = time.perf_counter()
        embeddings = self.encoder.encode(texts)
        share = (time.perf_counter() - start) / max(1, len(texts))  # encoder seconds, spread over the rows
        return {
            "passage_id": batch["passage_id"],
            "embedding": embeddings,
            "encode_seconds": np.full(len(texts), share),
        }


def build_passage_index(
    passages_path: str,
    index_dir: str,
    index_config: IndexConfig,
    encoder_path: str | None = None,
    concurrency: int = 1,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Embed every passage with an actor pool and stream the embeddings into a FAISS index."""
    index_config.validate()
    start = time.perf_counter()
    dataset = ray.data.read_parquet(passages_path, columns=["passage_id", "title", "text"])
    embedded = dataset.map_batches(
        EmbedPassages,
        fn_constructor_kwargs={"encoder_path": encoder_path, "batch_size": batch_size},
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=batch_size * 4,
        batch_format="numpy",
    )
    passage_ids: list[str] = []
    pending: list[np.ndarray] = []
    index = None
    buffered = 0
    encode_seconds = 0.0
    for batch in embedded.iter_batches(batch_size=4096, batch_format="numpy"):
        passage_ids.extend(str(p) for p in batch["passage_id"])
        encode_seconds += float(batch["encode_seconds"].sum())
        vectors = np.ascontiguousarray(np.stack(batch["embedding"]), dtype=np.float32)
        if index is None and index_config.needs_training:
            pending.append(vectors)
            buffered += len(vectors)
            if buffered < index_config.train_size:
                continue
            index = _trained_index(index_config, pending)
            for block in pending:
                index.add(block)
            pending = []
            continue
        if index is None:
            index = new_faiss_index(index_config, vectors.shape[1], 0)
        index.add(vectors)
    if index is None:
        if not pending:
            raise ValueError(f"{passages_path}: no passages to index")
        index = _trained_index(index_config, pending)
        for block in pending:
            index.add(block)
    index_start = time.perf_counter()
    encoder_name = os.path.basename(os.path.normpath(encoder_path or default_encoder_path()))
    manifest = index_manifest(index_config, index.d, len(passage_ids), encoder_name)
    PassageIndex(index, passage_ids, manifest).save(index_dir)
    end = time.perf_counter()
    return {
        "passages": len(passage_ids),
        "wall_seconds": end - start,  # actor start-up, reading, embedding, indexing, saving
        "encode_seconds": encode_seconds,  # time inside the encoder, summed over actors
        "passages_per_second": len(passage_ids) / max(encode_seconds, 1e-9),  # per actor
        "index_save_seconds": end - index_start,
        "index_type": index_config.type,
    }


def _trained_index(config: IndexConfig, blocks: list[np.ndarray]):
    sample = np.concatenate(blocks)[: config.train_size]
    index = new_faiss_index(config, sample.shape[1], len(sample))
    index.train(sample)
    return index


class Retriever:
    """The dense retriever over the passage table: query encoder + FAISS index + the passages' text."""

    def __init__(self, index_dir: str, passages_path: str, encoder_path: str | None, use_gpu: bool = True) -> None:
        self.index = PassageIndex.load(index_dir, use_gpu=use_gpu)
        self.encoder = DenseEncoder(encoder_path)
        if self.encoder.dimension != self.index.manifest["dimension"]:
            raise ValueError(
                f"encoder {self.encoder.name} gives {self.encoder.dimension}-d vectors but the index at {index_dir} "
                f"holds {self.index.manifest['dimension']}-d ones (built by {self.index.manifest['encoder']})"
            )
        table = pq.read_table(passages_path, columns=list(PASSAGE_COLUMNS)).to_pydict()
        self.passages = {
            pid: (wid, title, text)
            for pid, wid, title, text in zip(table["passage_id"], table["wikipedia_id"], table["title"], table["text"])
        }
        self.passages_by_page: dict[
            str, list[tuple[int, int, str]]
        ] = {}  # wikipedia_id -> paragraph ranges of its passages
        for pid, wid, first, last in zip(
            table["passage_id"], table["wikipedia_id"], table["start_paragraph_id"], table["end_paragraph_id"]
        ):
            self.passages_by_page.setdefault(str(wid), []).append((int(first), int(last), pid))
        unknown = [pid for pid in self.index.passage_ids if pid not in self.passages]
        if unknown:
            raise ValueError(
                f"the index at {index_dir} holds {len(unknown)} passage ids missing from {passages_path} "
                f"(e.g. {unknown[0]!r}): index and passages come from different builds; rebuild the index"
            )

    @property
    def num_passages(self) -> int:
        return len(self.index.passage_ids)

    def search(self, questions: list[str], k: int) -> list[dict[str, list]]:
        """Top-k passages of each question: ids, scores, pages, titles, texts."""
        scores, ids = self.index.search(self.encoder.encode([str(q) for q in questions]), k)
        return [
            {
                "ids": row,
                "scores": [float(s) for s in score_row[: len(row)]],
                "pages": [self.passages[p][0] for p in row],
                "titles": [self.passages[p][1] for p in row],
                "texts": [self.passages[p][2] for p in row],
            }
            for row, score_row in zip(ids, scores)
        ]


class RetrieveBatch:
    """Ray Data actor: holds a `Retriever`; adds the top-k passages to every example."""

    def __init__(self, index_dir: str, passages_path: str, encoder_path: str | None, num_passages: int) -> None:
        self.retriever = Retriever(index_dir, passages_path, encoder_path)
        self.num_passages = num_passages

    def __call__(self, batch):
        start = time.perf_counter()
        results = self.retriever.search(list(batch["input"]), self.num_passages)
        out = batch.copy()
        out["retrieve_seconds"] = (time.perf_counter() - start) / max(1, len(results))
        out["passage_ids"] = [r["ids"] for r in results]
        out["passage_scores"] = [r["scores"] for r in results]
        out["passage_pages"] = [r["pages"] for r in results]
        out["passage_titles"] = [r["titles"] for r in results]
        out["passage_texts"] = [r["texts"] for r in results]
        gold = [gold_passages(json.loads(evidence), self.retriever.passages_by_page) for evidence in batch["evidence"]]
        out["gold_passages"] = [json.dumps(sets) for sets in gold]
        # one passage per item of the first evidence set: what a gold-evidence reader warm-up (or oracle) reads
        first = [[holders[0] for holders in sets[0] if holders] if sets else [] for sets in gold]
        out["gold_ids"] = first
        out["gold_page_ids"] = [[self.retriever.passages[p][0] for p in ids] for ids in first]
        out["gold_titles"] = [[self.retriever.passages[p][1] for p in ids] for ids in first]
        out["gold_texts"] = [[self.retriever.passages[p][2] for p in ids] for ids in first]
        return out


def example_rows(path: str, task: str, split: str) -> list[dict[str, Any]]:
    """Flatten a KILT task file into rows: id, task, split, input, answers, provenance (gold pages per output, JSON),
    evidence (gold [page, start paragraph, end paragraph] items per output, JSON; retrieval turns it into `gold_passages`)."""
    examples, _ = read_kilt_examples(path)
    return [
        {
            "id": str(example["id"]),
            "task": task,
            "split": split,
            "input": example["input"],
            "answers": gold_answers(example),
            "provenance": json.dumps(gold_provenance(example)),
            "evidence": json.dumps(gold_paragraphs(example)),
        }
        for example in examples
    ]


def retrieve_examples(
    rows: list[dict[str, Any]],
    index_dir: str,
    passages_path: str,
    output_dir: str,
    num_passages: int,
    encoder_path: str | None = None,
    concurrency: int = 1,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Attach the top-k passages (ids, scores, pages, titles, texts), the ids of the passages holding the gold
    evidence (`gold_passages`, JSON: per evidence set, per item) and the ids, pages, titles and texts of one such passage
    per item of the first evidence set (`gold_ids`, `gold_page_ids`, `gold_titles`, `gold_texts`) to every row in one pass of an
    actor pool; write `<task>-<split>.parquet` per group of rows (rows carry `task` and `split`), each in the
    order of `rows`."""
    if not rows:
        raise ValueError("no examples to retrieve for")
    start = time.perf_counter()
    numbered = [{**row, "_position": position} for position, row in enumerate(rows)]
    retrieved = (
        ray.data.from_items(numbered)
        .map_batches(
            RetrieveBatch,
            fn_constructor_kwargs={
                "index_dir": index_dir,
                "passages_path": passages_path,
                "encoder_path": encoder_path,
                "num_passages": num_passages,
            },
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            batch_size=batch_size,
            batch_format="pandas",
        )
        .to_pandas()
    )
    # Ray Data does not keep row order across the actor pool: restore the input (KILT file) order
    retrieved = retrieved.sort_values("_position", kind="stable").drop(columns=["_position"]).reset_index(drop=True)
    seconds = time.perf_counter() - start
    busy = float(retrieved.pop("retrieve_seconds").sum())  # query encoding + search, inside the actors
    os.makedirs(output_dir, exist_ok=True)
    files = {}
    for (task, split), group in retrieved.groupby(["task", "split"], sort=True):
        path = os.path.join(output_dir, f"{task}-{split}.parquet")
        temporary = f"{path}.tmp-{os.getpid()}"
        pq.write_table(pa.Table.from_pandas(group.drop(columns=["split"]), preserve_index=False), temporary)
        os.replace(temporary, path)
        files[f"{task}-{split}"] = len(group)
    return {
        "examples": len(retrieved),
        "files": files,
        "wall_seconds": seconds,
        "retrieve_seconds": busy,
        "queries_per_second": len(retrieved) / max(busy, 1e-9),
    }


def retrieval_recall(
    path: str, ks: tuple[int, ...] = (5, 10, 25), level: str = "page", limit: int | None = None
) -> dict[int, float]:
    """Mean recall at each k over a retrieved Parquet file (its first `limit` rows; None = all):
    `eval.metrics.passage_recall` (page level, KILT's) or, at `level="passage"`, whether the top-k passages
    hold every gold evidence paragraph."""
    if level not in ("page", "passage"):
        raise ValueError(f"level must be 'page' or 'passage', got {level!r}")
    columns = ["provenance", "passage_pages"] if level == "page" else ["gold_passages", "passage_ids"]
    table = pq.read_table(path, columns=columns).slice(0, limit).to_pydict()
    totals = {k: 0.0 for k in ks}
    for gold, ranked in zip(*(table[column] for column in columns)):
        for k in ks:
            totals[k] += passage_recall(json.loads(gold), list(ranked), k, level)
    count = max(1, len(table[columns[0]]))
    return {k: totals[k] / count for k in ks}
