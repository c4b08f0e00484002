"""The retrieval stages of a prepared directory (the build_index job): passages -> embeddings -> FAISS index ->
top-k passages per example -> the retriever's recall@k on dev.

Reads what `glimmer_ray.data.prepare` wrote and writes next to it (a stage whose output exists is reused
unless overwrite=true):
    data/<task>-{train,dev}-kilt.jsonl    in: KILT-format examples
    passages.parquet                      in: the passages to embed
    index/                                out: FAISS index + passage ids + manifest
    retrieved/<task>-<split>.parquet      out: examples with their top-k passages
    index_report.json                     out: timings, recall@k per task on dev
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from glimmer_ray.cli import check_spare_cpu, run_stage, write_report
from glimmer_ray.config import to_dict
from glimmer_ray.data import synthkilt
from glimmer_ray.retrieval.index import IndexConfig, build_passage_index
from glimmer_ray.retrieval.retriever import example_rows, retrieval_recall, retrieve_examples


@dataclass
class BuildIndexConfig:
    output_dir: str = (
        "outputs/quickstart"  # prepared directory: data/ and passages.parquet in, index/ and retrieved/ out
    )
    tasks: list[str] = field(default_factory=lambda: list(synthkilt.TASKS))  # task names (file prefixes in data/)
    encoder_path: str | None = None  # sentence-transformers directory; null = packaged all-MiniLM-L6-v2
    index: IndexConfig = field(default_factory=IndexConfig)
    num_passages: int = 25  # k passages attached to every example
    recall_ks: list[int] = field(default_factory=lambda: [5, 10, 25])  # recall@k reported on dev
    concurrency: int = 1  # actors embedding / retrieving in parallel
    batch_size: int = 64  # texts per encoder call
    overwrite: bool = False  # redo stages whose outputs exist
    ray_address: str | None = None  # null: the cluster of `ray job submit`, else a new local one


def build_index(config: BuildIndexConfig) -> dict:
    """Embed and index the passages of a prepared directory, attach the top-k passages to every example, and
    measure the retriever's recall@k on dev (page and passage level); writes index_report.json. Runs inside
    the caller's Ray session."""
    root = config.output_dir
    passages_path = os.path.join(root, "passages.parquet")
    task_files = {
        (t, s): os.path.join(root, "data", f"{t}-{s}-kilt.jsonl") for t in config.tasks for s in ("train", "dev")
    }
    missing = [path for path in [passages_path, *task_files.values()] if not os.path.exists(path)]
    if missing:
        raise SystemExit(
            f"{root} is not a prepared directory: {', '.join(missing[:3])} missing; "
            "run jobs/prepare_data.py with this output_dir first (build_index=false stops it before this job)"
        )
    report: dict = {"config": to_dict(config)}
    check_spare_cpu(
        config.concurrency,
        f"concurrency={config.concurrency} encoder actors (1 CPU each)",
        "use fewer actors or a larger cluster",
    )

    # 1. embeddings + index
    index_dir = os.path.join(root, "index")
    built_index = run_stage("index", index_dir, config.overwrite)
    if built_index:
        report["index"] = build_passage_index(
            passages_path, index_dir, config.index, config.encoder_path, config.concurrency, config.batch_size
        )
        stats = report["index"]
        print(
            f"[index] {stats['passages']} passages embedded at {stats['passages_per_second']:.1f} passages/s per actor; "
            f"{config.index.type} index built and saved in {stats['index_save_seconds']:.2f} s; {stats['wall_seconds']:.1f} s in all"
        )

    # 2. retrieval for every task file, in one pass (redone when the index was rebuilt)
    retrieved_dir = os.path.join(root, "retrieved")
    if run_stage("retrieve", os.path.join(retrieved_dir, "manifest.json"), config.overwrite or built_index):
        rows = [row for (task, split), path in task_files.items() for row in example_rows(path, task, split)]
        report["retrieval"] = retrieve_examples(
            rows,
            index_dir,
            passages_path,
            retrieved_dir,
            config.num_passages,
            config.encoder_path,
            config.concurrency,
            config.batch_size,
        )
        print(
            f"[retrieve] {report['retrieval']['examples']} examples at {report['retrieval']['queries_per_second']:.1f} queries/s per actor "
            f"(query encoding + top-{config.num_passages} search); {report['retrieval']['wall_seconds']:.1f} s in all"
        )
        with open(os.path.join(retrieved_dir, "manifest.json"), "w") as handle:  # written last: the stage is complete
            json.dump(report["retrieval"], handle, indent=2)

    # 3. recall@k on dev
    ks = tuple(k for k in config.recall_ks if k <= config.num_passages)
    report["dev_recall"] = {
        task: retrieval_recall(os.path.join(retrieved_dir, f"{task}-dev.parquet"), ks) for task in config.tasks
    }
    print("\nretriever recall@k on dev (page level, gold evidence among the pages of the top-k passages)")
    print(f"{'task':<10}" + "".join(f"{'R@' + str(k):>8}" for k in ks))
    for task, recalls in report["dev_recall"].items():
        print(f"{task:<10}" + "".join(f"{recalls[k]:8.3f}" for k in ks))
    passage_ks = tuple(sorted({1, *ks}))
    report["dev_passage_recall"] = {
        task: retrieval_recall(os.path.join(retrieved_dir, f"{task}-dev.parquet"), passage_ks, level="passage")
        for task in config.tasks
    }
    print(
        "\nretriever recall@k on dev (passage level, the passages holding the gold evidence paragraphs among the top k)"
    )
    print(f"{'task':<10}" + "".join(f"{'R@' + str(k):>8}" for k in passage_ks))
    for task, recalls in report["dev_passage_recall"].items():
        print(f"{task:<10}" + "".join(f"{recalls[k]:8.3f}" for k in passage_ks))
    write_report(os.path.join(root, "index_report.json"), report)
    return report
