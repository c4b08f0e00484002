"""Prepare data for the reader (the prepare_data job): benchmark (or KILT files) -> tokenizer -> passages ->
(the retrieval stages of `glimmer_ray.retrieval.build`) FAISS index -> top-k passages per example.

Output directory layout (every stage is skipped when its output exists, unless overwrite=true):
    data/knowledge.jsonl, data/<task>-{train,dev}-kilt.jsonl     KILT formats (SynthKILT or copies of KILT)
    tokenizer/                                                   Hugging Face layout
    passages.parquet                                             <= max_words-word passages
    index/                                                       FAISS index + passage ids + manifest
    retrieved/<task>-<split>.parquet                             examples with their top-k passages
    index_report.json                                            build_index's report
    data_report.json                                             sizes, timings, recall@k per task
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass

from glimmer_ray.cli import run_stage, write_report
from glimmer_ray.config import to_dict
from glimmer_ray.data import synthkilt
from glimmer_ray.data.kilt import read_kilt_examples, read_knowledge_source
from glimmer_ray.data.tokenizer import save_tokenizer, train_t5_tokenizer
from glimmer_ray.retrieval.build import BuildIndexConfig, build_index
from glimmer_ray.retrieval.passages import write_passages


@dataclass
class PrepareConfig(BuildIndexConfig):
    """build_index's fields (output_dir, tasks, encoder, index, k, recall_ks, concurrency, batch_size, overwrite,
    ray_address) and the stages before the index."""

    source: str = "synthkilt"  # synthkilt: generate the bundled benchmark; kilt: read kilt_dir
    kilt_dir: str | None = None  # source=kilt: knowledge.jsonl and <task>-{train,dev}-kilt.jsonl
    scale: str = "quickstart"  # synthkilt size: tiny | quickstart | small | medium | large
    seed: int = 0  # synthkilt seed
    facts_seed: int | None = (
        None  # synthkilt: null, or re-deal the seed world's facts (a counterfactual twin: pre-training corpus, data.train_dirs)
    )
    split_seed: int | None = (
        None  # synthkilt: null (seed's split), or deal subjects into train/dev anew (a twin asking about the benchmark's dev subjects too)
    )
    max_words: int = 200  # words per passage (the paper: 200)
    tokenizer_vocab_size: int = 4000  # synthkilt tokenizer vocabulary (source=kilt brings the checkpoint's)
    build_index: bool = (
        True  # run jobs/build_index.py's stages (index, retrieval, recall); false: stop after the passages
    )


def tokenizer_texts(data_dir: str, tasks: list[str]) -> list[str]:
    """What a benchmark's tokenizer learns from: its pages, every question with its answers, the reader's
    template words."""
    pages, _ = read_knowledge_source(os.path.join(data_dir, "knowledge.jsonl"))
    texts = [" ".join(page["text"]) for page in pages]
    for task in tasks:
        for split in ("train", "dev"):
            examples, _ = read_kilt_examples(os.path.join(data_dir, f"{task}-{split}-kilt.jsonl"))
            texts.extend(e["input"] + " " + " ".join(o.get("answer", "") for o in e["output"]) for e in examples)
    texts.extend(f"{t}: title: context:" for t in tasks)
    return texts


def write_tokenizer(texts: list[str], vocab_size: int, tokenizer_dir: str) -> None:
    """Train a T5 tokenizer on `texts` and save it at `tokenizer_dir`, which appears whole or not at all."""
    save_tokenizer(train_t5_tokenizer(texts, vocab_size), tokenizer_dir + ".tmp")
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    os.replace(tokenizer_dir + ".tmp", tokenizer_dir)


def prepare_data(config: PrepareConfig) -> dict:
    """The benchmark (or KILT's files), its tokenizer and passages, then (build_index=true) the retrieval stages
    of `glimmer_ray.retrieval.build`; writes data_report.json. Runs inside the caller's Ray session."""
    root = config.output_dir
    data_dir = os.path.join(root, "data")
    os.makedirs(root, exist_ok=True)
    report: dict = {"config": to_dict(config)}

    # 1. the benchmark (or KILT's own files)
    if run_stage("data", os.path.join(data_dir, "manifest.json"), config.overwrite):
        start = time.perf_counter()
        if config.source == "synthkilt":
            manifest = synthkilt.generate(
                data_dir, config.scale, config.seed, facts_seed=config.facts_seed, split_seed=config.split_seed
            )
        elif config.source == "kilt":
            if not config.kilt_dir:
                raise SystemExit("source=kilt needs kilt_dir")
            if config.facts_seed is not None or config.split_seed is not None:
                raise SystemExit(
                    "facts_seed and split_seed re-deal SynthKILT's generated data; with source=kilt leave them null"
                )
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

    # 2. tokenizer for the benchmark
    tokenizer_dir = os.path.join(root, "tokenizer")
    if config.source == "synthkilt" and run_stage("tokenizer", tokenizer_dir, config.overwrite):
        write_tokenizer(tokenizer_texts(data_dir, config.tasks), config.tokenizer_vocab_size, tokenizer_dir)

    # 3. passages
    passages_path = os.path.join(root, "passages.parquet")
    if run_stage("passages", passages_path, config.overwrite):
        report["passages"] = write_passages(os.path.join(data_dir, "knowledge.jsonl"), passages_path, config.max_words)
        print(f"[passages] {report['passages']}")

    # 4-6. embeddings + index, retrieval for every task file, recall@k on dev: the build_index job
    if config.build_index:
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(BuildIndexConfig)}  # the inherited ones
        index_report = build_index(BuildIndexConfig(**fields))
        report.update({key: value for key, value in index_report.items() if key != "config"})
    else:
        print(
            f"[index] not built (build_index=false): python jobs/build_index.py --config jobs/configs/build_index.yaml output_dir={root}"
        )
    write_report(os.path.join(root, "data_report.json"), report)
    return report
