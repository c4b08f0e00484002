"""Prepare data for the reader: benchmark (or KILT files) -> tokenizer -> passages -> FAISS index -> top-k per example.

    python jobs/prepare_data.py --config jobs/configs/prepare_data.yaml
    ray job submit --working-dir . -- python jobs/prepare_data.py --config jobs/configs/prepare_data.yaml

Output directory layout (every stage is skipped when its output exists, unless overwrite=true):
    data/knowledge.jsonl, data/<task>-{train,dev}-kilt.jsonl     KILT formats (SynthKILT or copies of KILT)
    tokenizer/                                                   Hugging Face layout
    passages.parquet                                             <= max_words-word passages
    index/                                                       FAISS index + passage ids + manifest
    retrieved/<task>-<split>.parquet                             examples with their top-k passages
    data_report.json                                             sizes, timings, recall@k per task
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import ray

from glimmer_ray.config import parse_job_args, to_dict
from glimmer_ray.data import synthkilt
from glimmer_ray.data.kilt import read_kilt_examples, read_knowledge_source
from glimmer_ray.data.tokenizer import save_tokenizer, train_t5_tokenizer
from glimmer_ray.retrieval.index import IndexConfig
from glimmer_ray.retrieval.pipeline import build_passage_index, example_rows, retrieval_recall, retrieve_examples, write_passages


@dataclass
class PrepareConfig:
    output_dir: str = "outputs/quickstart"  # everything is written below this directory
    source: str = "synthkilt"  # synthkilt: generate the bundled benchmark; kilt: read kilt_dir
    kilt_dir: str | None = None  # source=kilt: knowledge.jsonl and <task>-{train,dev}-kilt.jsonl
    scale: str = "quickstart"  # synthkilt size: tiny | quickstart | small | medium | large
    seed: int = 0  # synthkilt seed
    tasks: list[str] = field(default_factory=lambda: list(synthkilt.TASKS))  # task names (file prefixes)
    max_words: int = 200  # words per passage (the paper: 200)
    tokenizer_vocab_size: int = 4000  # synthkilt tokenizer vocabulary (source=kilt brings the checkpoint's)
    encoder_path: str | None = None  # sentence-transformers directory; null = packaged all-MiniLM-L6-v2
    index: IndexConfig = field(default_factory=IndexConfig)
    num_passages: int = 25  # k passages attached to every example
    recall_ks: list[int] = field(default_factory=lambda: [5, 10, 25])  # recall@k reported on dev
    concurrency: int = 1  # actors embedding / retrieving in parallel
    batch_size: int = 64  # texts per encoder call
    overwrite: bool = False  # redo stages whose outputs exist
    ray_address: str | None = None  # null: the cluster of `ray job submit`, else a new local one


def _stage(name: str, output: str, config: PrepareConfig) -> bool:
    """True when the stage must run; prints why it is skipped otherwise."""
    if os.path.exists(output) and not config.overwrite:
        print(f"[{name}] reusing {output}")
        return False
    print(f"[{name}] ...", flush=True)
    return True


def main(config: PrepareConfig) -> dict:
    # setup
    root = config.output_dir
    data_dir = os.path.join(root, "data")
    os.makedirs(root, exist_ok=True)
    report: dict = {"config": to_dict(config)}
    started_ray = not ray.is_initialized()  # shut down only a cluster this job started
    ray.init(address=config.ray_address, ignore_reinit_error=True, log_to_driver=False)
    cpus = ray.cluster_resources().get("CPU", 0)
    if config.concurrency >= cpus:
        raise SystemExit(f"concurrency={config.concurrency} encoder actors (1 CPU each) would take all {cpus:.0f} CPUs of the "
                         "cluster and leave none for reading the data; use fewer actors or a larger cluster")

    # 1. the benchmark (or KILT's own files)
    if _stage("data", os.path.join(data_dir, "manifest.json"), config):
        start = time.perf_counter()
        if config.source == "synthkilt":
            manifest = synthkilt.generate(data_dir, config.scale, config.seed)
        elif config.source == "kilt":
            if not config.kilt_dir:
                raise SystemExit("source=kilt needs kilt_dir")
            os.makedirs(data_dir, exist_ok=True)
            names = ["knowledge.jsonl"] + [f"{t}-{s}-kilt.jsonl" for t in config.tasks for s in ("train", "dev")]
            for name in names:
                shutil.copyfile(os.path.join(config.kilt_dir, name), os.path.join(data_dir, name))
            manifest = {"name": "kilt", "records": {}}
            with open(os.path.join(data_dir, "manifest.json"), "w") as handle:
                json.dump(manifest, handle)
        else:
            raise SystemExit(f"unknown source {config.source!r}: synthkilt or kilt")
        report["generation_seconds"] = time.perf_counter() - start
        print(f"[data] {manifest['records']} in {report['generation_seconds']:.2f} s")
    task_files = {(t, s): os.path.join(data_dir, f"{t}-{s}-kilt.jsonl") for t in config.tasks for s in ("train", "dev")}

    # 2. tokenizer for the benchmark
    tokenizer_dir = os.path.join(root, "tokenizer")
    if config.source == "synthkilt" and _stage("tokenizer", tokenizer_dir, config):
        pages, _ = read_knowledge_source(os.path.join(data_dir, "knowledge.jsonl"))
        texts = [" ".join(page["text"]) for page in pages]
        for path in task_files.values():
            examples, _ = read_kilt_examples(path)
            texts.extend(e["input"] + " " + " ".join(o.get("answer", "") for o in e["output"]) for e in examples)
        texts.extend(f"{t}: title: context:" for t in config.tasks)
        save_tokenizer(train_t5_tokenizer(texts, config.tokenizer_vocab_size), tokenizer_dir + ".tmp")
        shutil.rmtree(tokenizer_dir, ignore_errors=True)
        os.replace(tokenizer_dir + ".tmp", tokenizer_dir)

    # 3. passages
    passages_path = os.path.join(root, "passages.parquet")
    if _stage("passages", passages_path, config):
        report["passages"] = write_passages(os.path.join(data_dir, "knowledge.jsonl"), passages_path, config.max_words)
        print(f"[passages] {report['passages']}")

    # 4. embeddings + index
    index_dir = os.path.join(root, "index")
    if _stage("index", index_dir, config):
        report["index"] = build_passage_index(passages_path, index_dir, config.index, config.encoder_path, config.concurrency, config.batch_size)
        stats = report["index"]
        print(f"[index] {stats['passages']} passages embedded at {stats['passages_per_second']:.1f} passages/s per actor; "
              f"{config.index.type} index built and saved in {stats['index_save_seconds']:.2f} s; {stats['wall_seconds']:.1f} s in all")

    # 5. retrieval for every task file, in one pass
    retrieved_dir = os.path.join(root, "retrieved")
    if _stage("retrieve", os.path.join(retrieved_dir, "manifest.json"), config):
        rows = [row for (task, split), path in task_files.items() for row in example_rows(path, task, split)]
        report["retrieval"] = retrieve_examples(rows, index_dir, passages_path, retrieved_dir, config.num_passages,
                                                config.encoder_path, config.concurrency, config.batch_size)
        print(f"[retrieve] {report['retrieval']['examples']} examples at {report['retrieval']['queries_per_second']:.1f} queries/s per actor "
              f"(query encoding + top-{config.num_passages} search); {report['retrieval']['wall_seconds']:.1f} s in all")
        with open(os.path.join(retrieved_dir, "manifest.json"), "w") as handle:  # written last: the stage is complete
            json.dump(report["retrieval"], handle, indent=2)

    # 6. recall@k on dev
    ks = tuple(k for k in config.recall_ks if k <= config.num_passages)
    report["dev_recall"] = {task: retrieval_recall(os.path.join(retrieved_dir, f"{task}-dev.parquet"), ks) for task in config.tasks}
    print("\nretriever recall@k on dev (page level, gold evidence among the pages of the top-k passages)")
    print(f"{'task':<10}" + "".join(f"{'R@' + str(k):>8}" for k in ks))
    for task, recalls in report["dev_recall"].items():
        print(f"{task:<10}" + "".join(f"{recalls[k]:8.3f}" for k in ks))
    with open(os.path.join(root, "data_report.json"), "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    print(f"wrote {os.path.join(root, 'data_report.json')}")

    # cleanup
    if started_ray:
        ray.shutdown()
    return report


if __name__ == "__main__":
    main(parse_job_args(PrepareConfig, __doc__.splitlines()[0], sys.argv[1:]))
