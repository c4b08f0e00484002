"""Quickstart: bundled benchmark -> index -> T5 pre-training -> multi-task GLIMMER training -> memory -> dev evaluation -> served answers.

    python jobs/quickstart.py --config jobs/configs/quickstart.yaml [output_dir=DIR]
    ray job submit --working-dir . -- python jobs/quickstart.py --config jobs/configs/quickstart.yaml

Every stage is the library function behind one of the jobs (prepare_data with build_index, pretrain, train,
build_memory, evaluate, serve), called with this directory on one Ray cluster: the Serve app is deployed as
jobs/serve.py deploys it, a few dev questions are answered over HTTP (the passages retrieved, the ones the reranker kept, the
answer) and the app is shut down. Everything lands under `output_dir`, laid out for other tools:

    data/<task>-dev-kilt.jsonl          gold dev sets (KILT format)        index/, passages.parquet, retrieved/
    predictions/<task>-dev-kilt.jsonl   KILT submission format             model/ (Hugging Face layout)
    metrics.json                        KILT metrics per task              memory/ (memory store + manifest)
    quickstart.json                     the summary printed at the end     runs/ (Ray Train checkpoints)
                                                                           t5-pretrained/ (the pre-trained T5)

Re-running with the same output directory reuses finished stages.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

from glimmer_ray.cli import ray_session, write_report
from glimmer_ray.config import load_config, parse_job_args, to_dict
from glimmer_ray.data import synthkilt
from glimmer_ray.data.prepare import PrepareConfig, prepare_data
from glimmer_ray.eval.run import EvaluateConfig, ModelEntry, run_evaluation
from glimmer_ray.memory.build import BuildMemoryConfig, run_build_memory
from glimmer_ray.retrieval.index import IndexConfig
from glimmer_ray.train.config import TrainConfig
from glimmer_ray.train.pretrain import PretrainConfig, run_pretraining
from glimmer_ray.train.run import run_training

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class QuickstartConfig:
    output_dir: str = "outputs/quickstart"  # every artifact below this directory
    scale: str = "quickstart"  # SynthKILT size: tiny | quickstart | small | medium | large
    tasks: list[str] = field(default_factory=lambda: list(synthkilt.TASKS))
    max_words: int = (
        64  # words per passage: ~ the reader's 96 passage tokens, so answers are not cut off (the paper: 200 / 304)
    )
    pretrain_config: str | None = (
        "jobs/configs/pretrain_quickstart.yaml"  # text-infilling pre-training of the T5; null = none (the recipe's model.checkpoint or random init)
    )
    pretrain_overrides: list[str] = field(
        default_factory=list
    )  # dotted overrides of the pre-training config, e.g. [steps=300]
    train_config: str = (
        "jobs/configs/train_quickstart.yaml"  # training recipe; its data/export/checkpoint paths are set here
    )
    train_overrides: list[str] = field(
        default_factory=list
    )  # dotted overrides of the training recipe, e.g. [optim.max_steps=50]
    memory_codec: str = "fp32"  # fp32 | bf16 | fp16 | int8 | pq
    questions: int = 3  # dev questions answered over HTTP at the end (0: do not serve)
    port: int = 8000  # HTTP port of the Serve proxy (127.0.0.1)
    ray_address: str | None = None  # null: the cluster of `ray job submit`, else a new local one


def _path(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(HERE, "..", path)


def _banner(number: int, name: str, detail: str) -> float:
    print(f"\n=== [{number}/6] {name}: {detail}", flush=True)
    return time.perf_counter()


def main(config: QuickstartConfig) -> dict:
    with ray_session(config.ray_address, log_to_driver=True):
        return _quickstart(config)


def _quickstart(config: QuickstartConfig) -> dict:
    # setup
    root = os.path.abspath(config.output_dir)
    os.makedirs(root, exist_ok=True)
    pretrain_dir = os.path.join(root, "t5-pretrained")
    train = load_config(
        TrainConfig,
        _path(config.train_config),
        list(config.train_overrides)
        + ([f"model.checkpoint={pretrain_dir}"] if config.pretrain_config else [])
        + [
            f"data.dir={root}",
            f"data.tasks={json.dumps(config.tasks)}",
            f"export_dir={os.path.join(root, 'model')}",
            f"checkpoint.storage_path={os.path.join(root, 'runs')}",
            "ray_address=null",
        ],
    )
    summary: dict = {"output_dir": root, "config": to_dict(config), "stages": {}}

    # 1. data, tokenizer, passages, index, retrieval
    clock = _banner(
        1,
        "data",
        f"SynthKILT {config.scale} -> passages -> FAISS index -> top-{train.data.num_passages} passages per example",
    )
    report = prepare_data(
        PrepareConfig(
            output_dir=root,
            scale=config.scale,
            tasks=list(config.tasks),
            max_words=config.max_words,
            num_passages=max(25, train.data.num_passages),
            recall_ks=[5, train.data.num_passages],
            index=IndexConfig(use_gpu=False),
        )
    )
    summary["stages"]["data"] = {"seconds": time.perf_counter() - clock, "dev_recall": report["dev_recall"]}

    # 2. pre-training of the T5 on the passages (no checkpoint can be downloaded), reused when complete
    if config.pretrain_config:
        pretrain = load_config(
            PretrainConfig,
            _path(config.pretrain_config),
            list(config.pretrain_overrides) + [f"data_dir={root}", f"output_dir={pretrain_dir}", "ray_address=null"],
        )
        clock = _banner(
            2,
            "pretrain",
            f"text infilling on the passages, {pretrain.steps} steps, d_model {pretrain.d_model}, {pretrain.num_layers} layers",
        )
        result = run_pretraining(pretrain)
        summary["stages"]["pretrain"] = {
            "seconds": time.perf_counter() - clock,
            "loss": [result["first_loss"], result["final_loss"]],
        }

    # 3. training (Ray Train + DeepSpeed), reused when the exported model exists
    model_dir = os.path.join(root, "model")
    clock = _banner(
        3,
        "train",
        f"{train.scaling.num_workers} workers, ZeRO-{train.deepspeed.zero_stage if train.deepspeed.enabled else 'off'}, "
        f"{train.optim.max_steps} steps, d_model {train.model.d_model}, k {train.data.num_passages} -> m {train.model.num_selected}",
    )
    if os.path.exists(os.path.join(model_dir, "config.json")):
        print(f"[train] reusing {model_dir}")
        summary["stages"]["train"] = {"seconds": 0.0, "reused": True}
    else:
        result = run_training(train)
        summary["stages"]["train"] = {
            "seconds": time.perf_counter() - clock,
            "metrics": {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))},
        }

    # 4. memory of every passage
    clock = _banner(4, "memory", f"memory encoder over every passage -> {config.memory_codec} shards")
    memory = run_build_memory(
        BuildMemoryConfig(
            passages=os.path.join(root, "passages.parquet"),
            model_dir=model_dir,
            tokenizer_dir=os.path.join(root, "tokenizer"),
            store=os.path.join(root, "memory"),
            codec=config.memory_codec,
            num_cpus_per_actor=0.5,
        )
    )
    summary["stages"]["memory"] = {
        "seconds": time.perf_counter() - clock,
        "passages": memory["passages_total"],
        "bytes": memory.get("bytes"),
    }

    # 5. dev evaluation from the stored memory
    clock = _banner(5, "evaluate", "KILT metrics per task; predictions in KILT's submission format")
    metrics_path = os.path.join(root, "metrics.json")
    if os.path.exists(metrics_path) and os.path.getmtime(metrics_path) > os.path.getmtime(
        os.path.join(model_dir, "config.json")
    ):
        print(f"[evaluate] reusing {metrics_path}")
        with open(metrics_path) as handle:
            metrics = json.load(handle)
        summary["stages"]["evaluate"] = {"reused": True}
    else:
        metrics = run_evaluation(
            EvaluateConfig(
                models=[ModelEntry(name="glimmer", path=model_dir, memory=os.path.join(root, "memory"))],
                data_dir=root,
                tasks=list(config.tasks),
                output_dir=root,
                flat_predictions=True,
            )
        )
    result = metrics["models"]["glimmer"]
    summary["stages"]["evaluate"] = {
        **summary["stages"].get("evaluate", {}),
        "seconds": time.perf_counter() - clock,
        "em": {t: s["em"] for t, s in result["scores"].items()},
        "reranker_recall_at_m": result["reranker_recall_at_m"],
        "retriever_recall_at_m": result["retriever_recall_at_m"],
        "passage_recall_at_1": {
            ranking: sum(r["1"][ranking] for r in result["passage_recall_by_task"].values())
            / len(result["passage_recall_by_task"])
            for ranking in ("reranker", "retriever")
        },
    }

    # 6. serve and ask
    clock = _banner(
        6, "serve", f"Serve app on http://127.0.0.1:{config.port}, {config.questions} dev questions over HTTP"
    )
    answers = _serve_and_ask(config, root, model_dir) if config.questions > 0 else []
    summary["stages"]["serve"] = {"answers": answers, "seconds": time.perf_counter() - clock}

    # report
    print("\n=== summary")
    print(f"{'stage':<10}{'seconds':>9}  result")
    stages = summary["stages"]
    print(
        f"{'data':<10}{stages['data']['seconds']:9.1f}  retriever recall@{train.data.num_passages} (dev, mean over tasks) "
        f"{sum(r[train.data.num_passages] for r in stages['data']['dev_recall'].values()) / len(config.tasks):.3f}"
    )
    if "pretrain" in stages:
        print(
            f"{'pretrain':<10}{stages['pretrain']['seconds']:9.1f}  denoising loss {stages['pretrain']['loss'][0]:.2f} -> {stages['pretrain']['loss'][1]:.2f}"
        )
    print(
        f"{'train':<10}{stages['train']['seconds']:9.1f}  "
        + (
            "reused"
            if stages["train"].get("reused")
            else f"{train.optim.max_steps} steps, final dev EM {stages['train']['metrics'].get('dev_em', float('nan')):.3f}"
        )
    )
    print(
        f"{'memory':<10}{stages['memory']['seconds']:9.1f}  {stages['memory']['passages']} passages, {(stages['memory']['bytes'] or 0) / 2**20:.1f} MiB"
    )
    ems = stages["evaluate"]["em"]
    print(
        f"{'evaluate':<10}{stages['evaluate']['seconds']:9.1f}  EM "
        + " ".join(f"{t} {ems[t]:.3f}" for t in list(config.tasks) + ["average"])
        + f"; reranker R@m {stages['evaluate']['reranker_recall_at_m']:.3f} vs retriever R@m {stages['evaluate']['retriever_recall_at_m']:.3f}"
        + f"; passage R@1 reranker {stages['evaluate']['passage_recall_at_1']['reranker']:.3f} vs retriever {stages['evaluate']['passage_recall_at_1']['retriever']:.3f}"
    )
    print(
        f"{'serve':<10}{stages['serve']['seconds']:9.1f}  {len(stages['serve']['answers'])} questions answered over HTTP"
    )
    write_report(os.path.join(root, "quickstart.json"), summary)
    print(
        f"\nartifacts in {root}: data/<task>-dev-kilt.jsonl (gold), predictions/<task>-dev-kilt.jsonl, metrics.json, model/, memory/, index/, quickstart.json"
    )
    return summary


def _serve_and_ask(config: QuickstartConfig, root: str, model_dir: str) -> list[dict]:
    import pyarrow.parquet as pq
    from ray import serve

    from glimmer_ray.client import GlimmerAPIError, GlimmerClient
    from serve_app.deploy import ask, deploy

    args = {
        "model_dir": model_dir,
        "index_dir": os.path.join(root, "index"),
        "passages": os.path.join(root, "passages.parquet"),
        "memory_store": os.path.join(root, "memory"),
        "deployments": {
            stage: {"num_replicas": 1}
            for stage in ("Retriever", "MemoryCache", "LiveEncoderReranker", "Decoder", "Ingress")
        },
    }
    answers = []
    try:
        client = GlimmerClient(deploy(args, port=config.port))
        for task in config.tasks[: config.questions]:
            for row in pq.read_table(
                os.path.join(root, "retrieved", f"{task}-dev.parquet"), columns=["input", "answers"]
            ).to_pylist()[:5]:
                try:
                    result = ask(client, row["input"], task, gold=row["answers"])
                except GlimmerAPIError as error:  # e.g. a question longer than the reader's lq: the next one
                    print(f"[serve] skipped a {task} question: {error}")
                    continue
                answers.append(
                    {
                        "task": task,
                        "question": row["input"],
                        "gold": row["answers"],
                        "answer": result.answer,
                        "kept": [p.title for p in result.passages if p.selected],
                    }
                )
                break
    finally:
        serve.shutdown()
    return answers


if __name__ == "__main__":
    main(parse_job_args(QuickstartConfig, __doc__.splitlines()[0], sys.argv[1:]))
