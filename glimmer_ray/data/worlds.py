"""Many SynthKILT worlds (the prepare_worlds job): a reader trained on one world memorises its few hundred pages;
trained on many worlds, each with fresh names, facts and pages, it can only answer by matching the question to a
passage and reading it. Held-out worlds are the honest dev set: none of their names, pages or facts is trained on.

Every world is retrieved in its own index, so its questions meet the retriever's real hard negatives (pages of the
same family, employer or city). Embedding and retrieval each run as one Ray Data pass over all worlds, with an
actor pool that keeps the dense encoder loaded; a world's index and retrieved files are written as soon as its
last row is in, so a killed run resumes at the first unfinished world.

Layout of `output_dir`, a prepared directory the train, evaluate, build_memory and serve jobs read like
prepare_data's:
    tokenizer/                          one tokenizer for every world (trained on the first training worlds)
    worlds/<train|dev>-<seed>/          per world: data/ (KILT files), passages.parquet, index/, retrieved/
    retrieved/<task>-train.parquet      every question of the training worlds (both of their splits)
    retrieved/<task>-dev.parquet        every question of the held-out worlds (both of their splits)
    passages.parquet, index/            the held-out worlds' passages and one exact index over them
    worlds_report.json                  sizes, throughput, the retriever's recall on the held-out worlds
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from glimmer_ray.cli import cluster_cpus, run_stage, write_report
from glimmer_ray.config import to_dict
from glimmer_ray.data import synthkilt
from glimmer_ray.data.prepare import tokenizer_texts, write_tokenizer
from glimmer_ray.retrieval.index import DenseEncoder, IndexConfig, PassageIndex, default_encoder_path
from glimmer_ray.retrieval.passages import dense_passage_text, write_passages
from glimmer_ray.retrieval.retriever import (
    Retriever,
    attach_passages,
    example_rows,
    retrieval_recall,
    write_retrieved,
)


@dataclass
class WorldsConfig:
    output_dir: str = "outputs/worlds"  # everything below this directory; finished worlds are reused
    scale: str = "quickstart"  # SynthKILT size of each world: tiny | quickstart | small | medium | large
    first_seed: int = 1000  # world seeds: training worlds first_seed.., then the held-out worlds
    train_worlds: int = 24  # worlds trained on
    dev_worlds: int = 1  # held-out worlds, never trained on
    tasks: list[str] = dataclasses.field(default_factory=lambda: list(synthkilt.TASKS))
    max_words: int = 64  # words per passage
    tokenizer_vocab_size: int = 4000  # tokens
    tokenizer_worlds: int = 4  # training worlds whose text trains the shared tokenizer
    encoder_path: str | None = None  # sentence-transformers directory; null = packaged all-MiniLM-L6-v2
    num_passages: int = 25  # k passages attached to every question
    recall_ks: list[int] = dataclasses.field(default_factory=lambda: [1, 5, 10, 25])  # recall@k on held-out worlds
    concurrency: int | None = None  # encoder actors; null = one per CPU of the cluster
    threads_per_actor: int = 1  # torch threads (and CPUs reserved) per encoder actor
    batch_size: int = 64  # texts per encoder call
    overwrite: bool = False  # redo every stage
    ray_address: str | None = None  # null: the cluster of `ray job submit`, else a new local one

    def validate(self) -> None:
        if self.scale not in synthkilt.SCALES:
            raise ValueError(f"unknown scale {self.scale!r}; choose one of {', '.join(synthkilt.SCALES)}")
        if self.train_worlds < 1 or self.dev_worlds < 1:
            raise ValueError(f"train_worlds and dev_worlds must be >= 1, got {self.train_worlds} and {self.dev_worlds}")
        if not 1 <= self.tokenizer_worlds <= self.train_worlds:
            raise ValueError(f"tokenizer_worlds must lie in [1, train_worlds], got {self.tokenizer_worlds}")
        unknown = sorted(set(self.tasks) - set(synthkilt.TASKS))
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {', '.join(synthkilt.TASKS)}; unknown: {unknown}")
        if self.num_passages < 1 or self.threads_per_actor < 1 or self.batch_size < 1:
            raise ValueError("num_passages, threads_per_actor and batch_size must be positive")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be positive or null, got {self.concurrency}")

    def worlds(self) -> list[tuple[str, int]]:
        """(name, seed) of every world: the training worlds, then the held-out ones."""
        seeds = range(self.first_seed, self.first_seed + self.train_worlds + self.dev_worlds)
        return [(f"{'train' if i < self.train_worlds else 'dev'}-{seed}", seed) for i, seed in enumerate(seeds)]


class EncodeWorldTexts:
    """Ray Data actor: the dense encoder, loaded once, with `threads` torch threads; embeds a batch of texts."""

    def __init__(self, encoder_path: str | None, batch_size: int, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.encoder = DenseEncoder(encoder_path, batch_size=batch_size)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        start = time.perf_counter()
        embeddings = self.encoder.encode(list(batch["text"]))
        return pd.DataFrame(
            {
                "world": batch["world"],
                "key": batch["key"],
                "embedding": list(embeddings),
                "encode_seconds": (time.perf_counter() - start) / max(1, len(batch)),
            }
        )


class RetrieveInWorlds:
    """Ray Data actor: one dense encoder and, loaded on first use, each world's index and passages; attaches the
    top-k passages of its own world to every question."""

    def __init__(self, root: str, encoder_path: str | None, batch_size: int, threads: int, num_passages: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.root = root
        self.encoder = DenseEncoder(encoder_path, batch_size=batch_size)
        self.num_passages = num_passages
        self.retrievers: dict[str, Retriever] = {}

    def _retriever(self, world: str) -> Retriever:
        if world not in self.retrievers:
            directory = os.path.join(self.root, "worlds", world)
            self.retrievers[world] = Retriever(
                os.path.join(directory, "index"),
                os.path.join(directory, "passages.parquet"),
                None,
                use_gpu=False,
                encoder=self.encoder,
            )
        return self.retrievers[world]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        parts = [
            attach_passages(group, self._retriever(world), self.num_passages)
            for world, group in batch.groupby("world", sort=False)
        ]
        return pd.concat(parts, ignore_index=True)


def prepare_worlds(config: WorldsConfig) -> dict[str, Any]:
    """Generate, tokenise, embed, index and retrieve every world, then write the merged train/dev streams and
    the held-out worlds' passages and index; writes worlds_report.json. Runs inside the caller's Ray session."""
    config.validate()
    root = config.output_dir
    worlds = config.worlds()
    report: dict[str, Any] = {"config": to_dict(config), "worlds": [name for name, _ in worlds]}
    if config.overwrite:
        for path in ("worlds", "tokenizer", "retrieved", "index"):
            shutil.rmtree(os.path.join(root, path), ignore_errors=True)
    os.makedirs(os.path.join(root, "worlds"), exist_ok=True)

    # 1. the worlds' KILT files and passages (a fraction of a second each)
    start = time.perf_counter()
    for name, seed in worlds:
        directory = os.path.join(root, "worlds", name)
        if not os.path.exists(os.path.join(directory, "data", "manifest.json")):
            synthkilt.generate(os.path.join(directory, "data"), config.scale, seed, id_prefix=f"{name}-")
        if not os.path.exists(os.path.join(directory, "passages.parquet")):
            write_passages(
                os.path.join(directory, "data", "knowledge.jsonl"),
                os.path.join(directory, "passages.parquet"),
                config.max_words,
            )
    report["generate_seconds"] = time.perf_counter() - start
    print(f"[worlds] {len(worlds)} worlds generated and cut into passages in {report['generate_seconds']:.1f} s")

    # 2. one tokenizer for all
    tokenizer_dir = os.path.join(root, "tokenizer")
    if run_stage("tokenizer", tokenizer_dir, False):
        texts = [
            text
            for name, _ in worlds[: config.tokenizer_worlds]
            for text in tokenizer_texts(os.path.join(root, "worlds", name, "data"), config.tasks)
        ]
        write_tokenizer(texts, config.tokenizer_vocab_size, tokenizer_dir)

    concurrency = config.concurrency or max(1, int(cluster_cpus() // config.threads_per_actor))
    report["actors"] = {"concurrency": concurrency, "threads_per_actor": config.threads_per_actor}
    # 3. every world's passages embedded in one pass; each world's index saved when its last passage is in
    report["embed"] = _embed_worlds(root, worlds, config, concurrency)
    # 4. every world's questions retrieved in one pass, each in its own world's index
    report["retrieve"] = _retrieve_worlds(root, worlds, config, concurrency)
    # 5. the merged streams, the held-out worlds' passages and index
    report["files"] = _merge_worlds(root, worlds, config)

    ks = tuple(k for k in config.recall_ks if k <= config.num_passages)
    report["dev_passage_recall"] = {
        task: retrieval_recall(os.path.join(root, "retrieved", f"{task}-dev.parquet"), ks, level="passage")
        for task in config.tasks
    }
    print_worlds_report(report, ks)
    write_report(os.path.join(root, "worlds_report.json"), report)
    return report


def _embed_worlds(root: str, worlds: list[tuple[str, int]], config: WorldsConfig, concurrency: int) -> dict:
    import ray

    todo = [name for name, _ in worlds if not os.path.exists(os.path.join(root, "worlds", name, "index"))]
    if not todo:
        print("[embed] reusing every world's index")
        return {"worlds": 0}
    frames = []
    for name in todo:
        table = pq.read_table(os.path.join(root, "worlds", name, "passages.parquet")).to_pandas()
        texts = [dense_passage_text(t, x) for t, x in zip(table["title"], table["text"])]
        frames.append(pd.DataFrame({"world": name, "key": table["passage_id"], "text": texts}))
    rows = pd.concat(frames, ignore_index=True)
    expected = rows.groupby("world").size().to_dict()
    print(f"[embed] {len(rows)} passages of {len(todo)} worlds, {concurrency} actors ...", flush=True)
    start = time.perf_counter()
    embedded = ray.data.from_pandas(_blocks(rows, config.batch_size * 4)).map_batches(
        EncodeWorldTexts,
        fn_constructor_kwargs={
            "encoder_path": config.encoder_path,
            "batch_size": config.batch_size,
            "threads": config.threads_per_actor,
        },
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=config.threads_per_actor,
        batch_size=config.batch_size * 4,
        batch_format="pandas",
    )
    pending: dict[str, list[tuple[str, np.ndarray]]] = defaultdict(list)
    encode_seconds = 0.0
    done = 0
    encoder_name = os.path.basename(os.path.normpath(config.encoder_path or default_encoder_path()))
    for batch in embedded.iter_batches(batch_size=None, batch_format="pandas"):
        encode_seconds += float(batch["encode_seconds"].sum())
        for world, key, vector in zip(batch["world"], batch["key"], batch["embedding"]):
            pending[world].append((key, vector))
            if len(pending[world]) == expected[world]:  # the world is complete: save its index now
                ordered = sorted(pending.pop(world))
                PassageIndex.build(
                    np.stack([v for _, v in ordered]),
                    [k for k, _ in ordered],
                    IndexConfig(type="flat", use_gpu=False),
                    encoder_name,
                ).save(os.path.join(root, "worlds", world, "index"))
                done += 1
                print(f"[embed] {done}/{len(todo)} worlds indexed, {time.perf_counter() - start:.0f} s", flush=True)
    wall = time.perf_counter() - start
    return {
        "worlds": len(todo),
        "passages": len(rows),
        "wall_seconds": wall,
        "passages_per_second": len(rows) / wall,  # the whole pool, start-up included
        "passages_per_second_per_actor": len(rows) / max(encode_seconds, 1e-9),  # inside the encoder
    }


def _retrieve_worlds(root: str, worlds: list[tuple[str, int]], config: WorldsConfig, concurrency: int) -> dict:
    import ray

    def finished(name: str) -> bool:
        return os.path.exists(os.path.join(root, "worlds", name, "retrieved", "manifest.json"))

    todo = [name for name, _ in worlds if not finished(name)]
    if not todo:
        print("[retrieve] reusing every world's retrieved files")
        return {"worlds": 0}
    rows = pd.DataFrame(
        [
            {**row, "world": name, "_position": position}
            for name in todo
            for task in config.tasks
            for split in ("train", "dev")
            for position, row in enumerate(
                example_rows(os.path.join(root, "worlds", name, "data", f"{task}-{split}-kilt.jsonl"), task, split)
            )
        ]
    )
    expected = rows.groupby("world").size().to_dict()
    print(f"[retrieve] {len(rows)} questions of {len(todo)} worlds, {concurrency} actors ...", flush=True)
    start = time.perf_counter()
    retrieved = ray.data.from_pandas(_blocks(rows, config.batch_size * 4)).map_batches(
        RetrieveInWorlds,
        fn_constructor_kwargs={
            "root": os.path.abspath(root),
            "encoder_path": config.encoder_path,
            "batch_size": config.batch_size,
            "threads": config.threads_per_actor,
            "num_passages": config.num_passages,
        },
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=config.threads_per_actor,
        batch_size=config.batch_size,
        batch_format="pandas",
    )
    pending: dict[str, list[pd.DataFrame]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    busy = 0.0
    done = 0
    for batch in retrieved.iter_batches(batch_size=None, batch_format="pandas"):
        busy += float(batch["retrieve_seconds"].sum())
        for world, group in batch.groupby("world", sort=False):
            pending[world].append(group)
            counts[world] += len(group)
            if counts[world] == expected[world]:  # the world is complete: write its files now
                frame = pd.concat(pending.pop(world)).sort_values(["task", "split", "_position"], kind="stable")
                frame = frame.drop(columns=["_position", "world", "retrieve_seconds"]).reset_index(drop=True)
                directory = os.path.join(root, "worlds", world, "retrieved")
                files = write_retrieved(frame, directory)
                with open(os.path.join(directory, "manifest.json"), "w") as handle:  # last: the world is complete
                    json.dump({"files": files, "num_passages": config.num_passages}, handle, indent=2)
                done += 1
                print(f"[retrieve] {done}/{len(todo)} worlds, {time.perf_counter() - start:.0f} s", flush=True)
    wall = time.perf_counter() - start
    return {
        "worlds": len(todo),
        "questions": len(rows),
        "wall_seconds": wall,
        "queries_per_second": len(rows) / wall,  # the whole pool, start-up included
        "queries_per_second_per_actor": len(rows) / max(busy, 1e-9),  # query encoding + search, inside the actors
    }


def _blocks(frame: pd.DataFrame, rows: int) -> list[pd.DataFrame]:
    """The frame in blocks of `rows` rows: one block would feed one actor of the pool only."""
    return [frame.iloc[i : i + rows] for i in range(0, len(frame), rows)]


def _merge_worlds(root: str, worlds: list[tuple[str, int]], config: WorldsConfig) -> dict[str, int]:
    """retrieved/<task>-train.parquet from the training worlds, <task>-dev.parquet from the held-out ones (both
    splits of each world), and the held-out worlds' passages.parquet and index/."""
    by_kind = {kind: [name for name, _ in worlds if name.startswith(kind + "-")] for kind in ("train", "dev")}
    out_dir = os.path.join(root, "retrieved")
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    for kind, names in by_kind.items():
        for task in config.tasks:
            tables = [
                pq.read_table(os.path.join(root, "worlds", name, "retrieved", f"{task}-{split}.parquet"))
                for name in names
                for split in ("train", "dev")
            ]
            path = os.path.join(out_dir, f"{task}-{kind}.parquet")
            temporary = f"{path}.tmp-{os.getpid()}"
            merged = pa.concat_tables(tables, promote_options="default")
            pq.write_table(merged, temporary)
            os.replace(temporary, path)
            files[f"{task}-{kind}"] = merged.num_rows
    passages = pa.concat_tables(
        [pq.read_table(os.path.join(root, "worlds", name, "passages.parquet")) for name in by_kind["dev"]]
    )
    temporary = os.path.join(root, f"passages.parquet.tmp-{os.getpid()}")
    pq.write_table(passages, temporary)
    os.replace(temporary, os.path.join(root, "passages.parquet"))
    indexes = [PassageIndex.load(os.path.join(root, "worlds", name, "index"), use_gpu=False) for name in by_kind["dev"]]
    PassageIndex.build(
        np.concatenate([part.index.reconstruct_n(0, part.index.ntotal) for part in indexes]),
        [pid for part in indexes for pid in part.passage_ids],
        IndexConfig(type="flat", use_gpu=False),
        indexes[0].manifest["encoder"],
    ).save(os.path.join(root, "index"))
    files["dev_passages"] = passages.num_rows
    return files


def print_worlds_report(report: dict[str, Any], ks: tuple[int, ...]) -> None:
    embed, retrieve = report["embed"], report["retrieve"]
    print(f"\n{'stage':<10}{'items':>10}{'wall s':>10}{'items/s':>10}{'per actor':>11}")
    if embed.get("worlds"):
        print(
            f"{'embed':<10}{embed['passages']:>10}{embed['wall_seconds']:>10.1f}{embed['passages_per_second']:>10.1f}"
            f"{embed['passages_per_second_per_actor']:>11.1f}"
        )
    if retrieve.get("worlds"):
        print(
            f"{'retrieve':<10}{retrieve['questions']:>10}{retrieve['wall_seconds']:>10.1f}"
            f"{retrieve['queries_per_second']:>10.1f}{retrieve['queries_per_second_per_actor']:>11.1f}"
        )
    print(f"\nretriever passage recall on the held-out worlds ({report['files']['dev_passages']} passages)")
    print(f"{'task':<10}" + "".join(f"{'R@' + str(k):>8}" for k in ks))
    for task, recalls in report["dev_passage_recall"].items():
        print(f"{task:<10}" + "".join(f"{recalls[k]:8.3f}" for k in ks))
