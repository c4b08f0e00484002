"""The evaluate job: trained readers answer the retrieved dev (or training) examples; KILT metrics per task and
recall at m of the reranker, the retriever and the distillation teacher, at page and passage level.

Every model in `models` (a directory exported by jobs/train.py) answers the same examples, tokenised as it
was trained (its reading.json). Predictions go to `<output_dir>/predictions/<model>/<task>-<split>-kilt.jsonl`
in KILT's submission format (`flat_predictions`: `<output_dir>/predictions/`), the scores to
`<output_dir>/metrics.json`. A model trained closed-book (`closed_book: true`) reads no passages; one
that `reads: gold` reads the gold evidence passages alone (the oracle: the reader, retrieval aside).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import pyarrow.parquet as pq
import torch
from transformers import AutoTokenizer

from glimmer_ray.cli import write_report
from glimmer_ray.config import to_dict
from glimmer_ray.data import synthkilt
from glimmer_ray.data.kilt import prediction_record, write_jsonl
from glimmer_ray.data.reading import load_reading
from glimmer_ray.data.stream import TokenizeConfig
from glimmer_ray.eval.evaluate import dev_batches, predict, read_gold_evidence, score_predictions, teacher_selection
from glimmer_ray.eval.metrics import prediction_recall, retriever_recall
from glimmer_ray.memory.store import MemoryStore
from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.model.flops import formula_flops
from glimmer_ray.retrieval.retriever import retrieval_recall


@dataclass
class ModelEntry:
    name: str = "glimmer"  # label in the table and the predictions folder
    path: str = "outputs/quickstart/model"  # exported Hugging Face directory (model + tokenizer)
    closed_book: bool = False  # read no passages (the closed-book baseline)
    num_selected: int | None = None  # m override for this evaluation; null = the model's
    num_passages: int | None = None  # k read by this model; null = the evaluation's num_passages
    live_proportion: float | None = None  # alpha for this evaluation (1.0: the same weights as FiD); null = the model's
    memory: str | None = None  # memory store (jobs/build_memory.py) read instead of encoding passages; null = encode
    teacher_recall: bool | None = None  # the teacher's recall for this model; null = the evaluation's teacher_recall
    reads: str = "retrieved"  # retrieved: the k retrieved, reranked to m | gold: the gold evidence passages alone (oracle: the reader, retrieval and reranking aside)


@dataclass
class EvaluateConfig:
    models: list[ModelEntry] = field(default_factory=lambda: [ModelEntry()])
    data_dir: str = "outputs/quickstart"  # jobs/prepare_data.py output (retrieved/)
    tasks: list[str] = field(default_factory=lambda: list(synthkilt.TASKS))
    num_passages: int | None = None  # k read per example; null = as each model was trained (its reading.json)
    evidence_passages: int = 2  # g gold evidence passages a `reads: gold` model reads (two-hop evidence has two)
    limit_per_task: int | None = None  # dev examples per task; null = all
    batch_size: int = 16  # examples per call
    output_dir: str = "outputs/quickstart/eval"  # predictions/ and metrics.json
    teacher_recall: bool = (
        True  # also the recall@m of the distillation teacher's ranking (one more pass over the dev set)
    )
    flat_predictions: bool = (
        False  # one model: predictions/<task>-dev-kilt.jsonl (KILT's layout) instead of predictions/<model>/
    )
    split: str = "dev"  # dev | train: the training examples, to tell what the reranker learned from what carries to new questions


def run_evaluation(config: EvaluateConfig) -> dict:
    """Every model answers the same examples, read as it was trained (its reading.json); predictions in KILT's
    format and the scores (metrics.json) under output_dir. Returns the results written to metrics.json."""
    if config.flat_predictions and len(config.models) != 1:
        raise SystemExit("flat_predictions needs exactly one model (their predictions would overwrite each other)")
    if config.split not in ("dev", "train"):
        raise SystemExit(f"split must be 'dev' or 'train', got {config.split!r}")
    paths = {
        task: os.path.join(config.data_dir, "retrieved", f"{task}-{config.split}.parquet") for task in config.tasks
    }
    for entry in config.models:
        if entry.reads not in ("retrieved", "gold"):
            raise SystemExit(f"model {entry.name}: reads must be 'retrieved' or 'gold', got {entry.reads!r}")
        if entry.reads == "gold" and (entry.closed_book or entry.memory or entry.num_selected):
            raise SystemExit(
                f"model {entry.name}: reads 'gold' reads all g evidence passages from their tokens "
                "(no closed_book, memory or num_selected)"
            )
    if any(entry.reads == "gold" for entry in config.models) and config.evidence_passages < 1:
        raise SystemExit(
            f"evidence_passages must be >= 1 for a model that reads the gold evidence, got {config.evidence_passages}"
        )
    results: dict = {"config": to_dict(config), "models": {}}

    # loop: every model answers the same examples
    for entry in config.models:
        options = {} if entry.live_proportion is None else {"live_proportion": entry.live_proportion}
        model = GlimmerForConditionalGeneration.from_pretrained(entry.path, **options).eval()
        tokenizer = AutoTokenizer.from_pretrained(entry.path)
        reading = load_reading(entry.path)
        gold = entry.reads == "gold"
        tokenize = TokenizeConfig.as_trained(
            reading, entry.num_passages or config.num_passages, config.evidence_passages if gold else 0
        )
        k = tokenize.num_passages
        m = config.evidence_passages if gold else entry.num_selected or model.config.num_selected or k
        store = None
        if entry.memory:
            store = MemoryStore(entry.memory)
            store.check_model(model, tokenizer)
        start = time.perf_counter()
        batches = list(
            dev_batches(
                paths,
                os.path.join(config.data_dir, "tokenizer"),
                tokenize,
                config.batch_size,
                config.limit_per_task,
            )
        )
        if gold:
            batches = [read_gold_evidence(batch) for batch in batches]
        predictions = predict(
            model,
            batches,
            tokenizer,
            max_new_tokens=reading.answer_tokens,
            closed_book=entry.closed_book,
            num_selected=m if gold else entry.num_selected,
            device=torch.device("cpu"),
            memory=store,
        )
        seconds = time.perf_counter() - start
        scores = score_predictions(predictions)
        by_task: dict[str, list] = {}
        for prediction in predictions:
            by_task.setdefault(prediction["task"], []).append(prediction)
        for task, rows in by_task.items():
            folder = (
                os.path.join(config.output_dir, "predictions")
                if config.flat_predictions
                else os.path.join(config.output_dir, "predictions", entry.name)
            )
            write_jsonl(
                os.path.join(folder, f"{task}-{config.split}-kilt.jsonl"),
                (prediction_record(p["id"], p["answer"], p["pages"]) for p in rows),
            )
        retriever = _retriever_recall(config, paths, m)
        cutoffs = sorted({1, m})
        retriever_passages = {
            task: retrieval_recall(path, tuple(cutoffs), level="passage", limit=config.limit_per_task or None)
            for task, path in paths.items()
        }
        teacher: dict[str, list] = {}
        wants_teacher = config.teacher_recall if entry.teacher_recall is None else entry.teacher_recall
        if not entry.closed_book and not gold and wants_teacher:
            for selection in teacher_selection(model, batches, m, device=torch.device("cpu")):
                teacher.setdefault(selection["task"], []).append(selection)
        pair_tokens = reading.question_tokens + reading.passage_tokens
        flops = (
            None
            if entry.closed_book
            else formula_flops(
                model.config,
                m if gold else k,
                pair_tokens,
                reading.answer_tokens,
                reading.question_tokens,
                m if gold or entry.num_selected else None,
            ).total
        )
        results["models"][entry.name] = {
            "scores": scores,
            "num_passages": m if gold else k,
            "live_proportion": model.config.live_proportion,
            "flops_per_example": flops,  # the paper's formulas, attention scores aside
            "seconds": seconds,
            "examples_per_second": len(predictions) / seconds,
            "num_selected": m,
            "closed_book": entry.closed_book,
            "reads": entry.reads,
            "reranker_recall_at_m": None if entry.closed_book or gold else prediction_recall(predictions),
            "retriever_recall_at_m": sum(retriever.values()) / max(1, len(retriever)),
            "recall_at_m_by_task": {
                task: {
                    "reranker": None if entry.closed_book or gold else prediction_recall(rows),
                    "retriever": retriever[task],
                    "teacher": prediction_recall(teacher[task]) if task in teacher else None,
                }
                for task, rows in by_task.items()
            },
            "passage_recall_by_task": {
                task: {
                    str(cutoff): {
                        "reranker": prediction_recall(rows, "reranked_passages", "passage", cutoff)
                        if rows[0]["reranked_passages"] and not gold
                        else None,
                        "retriever": retriever_passages[task][cutoff],
                        "teacher": prediction_recall(teacher[task], "reranked_passages", "passage", cutoff)
                        if task in teacher
                        else None,
                    }
                    for cutoff in cutoffs
                }
                for task, rows in by_task.items()
            },
        }

    # report
    tasks = list(config.tasks) + ["average"]
    print(
        f"\n{'model':<14}"
        + "".join(f"{t[:8]:>9}" for t in tasks)
        + f"{'rerank R@m':>11}{'retr. R@m':>10}{'MFLOP/ex':>10}"
    )
    for name, result in results["models"].items():
        print(
            f"{name:<14}"
            + "".join(f"{result['scores'][t]['em']:9.3f}" for t in tasks)
            + (
                f"{result['reranker_recall_at_m']:11.3f}"
                if result["reranker_recall_at_m"] is not None
                else f"{'-':>11}"
            )
            + f"{result['retriever_recall_at_m']:10.3f}"
            + (f"{result['flops_per_example'] / 1e6:10.1f}" if result["flops_per_example"] else f"{'-':>10}")
        )
    print(
        "(dev exact match per task; recall@m: kept passages cover a gold evidence set; a model that reads 'gold' read the"
        " gold evidence passages alone: how well it reads, retrieval and reranking aside)"
    )
    print(f"\n{'recall@m':<14}" + "".join(f"{t[:8]:>9}" for t in config.tasks))
    for name, result in results["models"].items():
        if result["reranker_recall_at_m"] is not None:
            by_task = result["recall_at_m_by_task"]
            print(f"{name:<14}" + "".join(f"{by_task[t]['reranker']:9.3f}" for t in config.tasks))
            print(f"{'  retriever':<14}" + "".join(f"{by_task[t]['retriever']:9.3f}" for t in config.tasks))
            if all(by_task[t]["teacher"] is not None for t in config.tasks):
                print(f"{'  pdist teacher':<14}" + "".join(f"{by_task[t]['teacher']:9.3f}" for t in config.tasks))
    print(
        "(page level, as KILT: the kept passages' pages cover a gold evidence set. reranker: its top m; retriever: the first m"
        " retrieved; pdist teacher: the top m by the gold answer's likelihood, each passage read alone -- the ranking"
        " distillation teaches)"
    )
    for name, result in results["models"].items():
        if (
            result["closed_book"]
            or next(iter(result["passage_recall_by_task"].values()))[str(result["num_selected"])]["reranker"] is None
        ):
            continue
        print(f"\n{name + ': passage recall@':<24}" + "".join(f"{t[:8]:>9}" for t in config.tasks) + f"{'mean':>9}")
        for cutoff in sorted({1, result["num_selected"]}):
            for ranking in ("reranker", "retriever", "teacher"):
                values = [result["passage_recall_by_task"][t][str(cutoff)][ranking] for t in config.tasks]
                if None in values:
                    continue
                print(
                    f"{f'  {ranking} @{cutoff}':<24}"
                    + "".join(f"{v:9.3f}" for v in values)
                    + f"{sum(values) / len(values):9.3f}"
                )
    print(
        "(passage level: the first passages of each ranking hold the gold evidence paragraphs themselves -- the passages"
        " the reader needs; two passages of the gold page are told apart)"
    )
    write_report(os.path.join(config.output_dir, "metrics.json"), results)
    return results


def _retriever_recall(config: EvaluateConfig, paths: dict[str, str], m: int) -> dict[str, float]:
    """Page-level recall@m of the retriever's own first m passages on the same examples, per task: as the
    reranker's, the m passages' pages cover a gold evidence set."""
    recall = {}
    for task, path in paths.items():
        table = pq.read_table(path, columns=["provenance", "passage_pages"]).slice(0, config.limit_per_task or None)
        rows = table.to_pydict()
        recall[task] = retriever_recall(m, rows["passage_pages"], rows["provenance"])
    return recall
