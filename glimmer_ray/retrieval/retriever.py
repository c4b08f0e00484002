"""The dense retriever: query encoder + FAISS index + the passages' text; a Ray Data actor pool that attaches
the top-k passages (and the passages holding the gold evidence) to every example; recall of the result."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from glimmer_ray.data.kilt import gold_answers, gold_paragraphs, gold_passages, gold_provenance, read_kilt_examples
from glimmer_ray.eval.metrics import passage_recall
from glimmer_ray.retrieval.index import DenseEncoder, PassageIndex
from glimmer_ray.retrieval.passages import PASSAGE_COLUMNS


class Retriever:
    """The dense retriever over the passage table: query encoder + FAISS index + the passages' text."""

    def __init__(
        self,
        index_dir: str,
        passages_path: str,
        encoder_path: str | None,
        use_gpu: bool = True,
        encoder: DenseEncoder | None = None,
    ) -> None:
        """`encoder`: an encoder loaded already (several retrievers, one per world, share it); else loaded
        from `encoder_path`."""
        self.index = PassageIndex.load(index_dir, use_gpu=use_gpu)
        self.encoder = encoder or DenseEncoder(encoder_path)
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
        return attach_passages(batch, self.retriever, self.num_passages)


def attach_passages(batch, retriever: Retriever, num_passages: int):
    """A pandas batch of example rows (`input`, `evidence`) with its top-k passages and gold passages attached
    (the columns `retrieve_examples` documents) and `retrieve_seconds`, the search time spread over the rows."""
    start = time.perf_counter()
    results = retriever.search(list(batch["input"]), num_passages)
    out = batch.copy()
    out["retrieve_seconds"] = (time.perf_counter() - start) / max(1, len(results))
    out["passage_ids"] = [r["ids"] for r in results]
    out["passage_scores"] = [r["scores"] for r in results]
    out["passage_pages"] = [r["pages"] for r in results]
    out["passage_titles"] = [r["titles"] for r in results]
    out["passage_texts"] = [r["texts"] for r in results]
    gold = [gold_passages(json.loads(evidence), retriever.passages_by_page) for evidence in batch["evidence"]]
    out["gold_passages"] = [json.dumps(sets) for sets in gold]
    # one passage per item of the first evidence set: what a gold-evidence reader warm-up (or oracle) reads
    first = [[holders[0] for holders in sets[0] if holders] if sets else [] for sets in gold]
    out["gold_ids"] = first
    out["gold_page_ids"] = [[retriever.passages[p][0] for p in ids] for ids in first]
    out["gold_titles"] = [[retriever.passages[p][1] for p in ids] for ids in first]
    out["gold_texts"] = [[retriever.passages[p][2] for p in ids] for ids in first]
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
    return {
        "examples": len(retrieved),
        "files": write_retrieved(retrieved, output_dir),
        "wall_seconds": seconds,
        "retrieve_seconds": busy,
        "queries_per_second": len(retrieved) / max(busy, 1e-9),
    }


def write_retrieved(retrieved, output_dir: str) -> dict[str, int]:
    """Write a frame of retrieved rows as `<task>-<split>.parquet` per group (each file appears whole); returns
    the rows per file."""
    os.makedirs(output_dir, exist_ok=True)
    files = {}
    for (task, split), group in retrieved.groupby(["task", "split"], sort=True):
        path = os.path.join(output_dir, f"{task}-{split}.parquet")
        temporary = f"{path}.tmp-{os.getpid()}"
        pq.write_table(pa.Table.from_pandas(group.drop(columns=["split"]), preserve_index=False), temporary)
        os.replace(temporary, path)
        files[f"{task}-{split}"] = len(group)
    return files


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
