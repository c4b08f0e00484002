"""Answer retrieved dev examples with a reader and score them with KILT's metrics, per task.

Predictions carry the answer and the pages of the passages the reranker kept (in score order, then the
other retrieved pages), so KILT's R-precision, recall@k and gated scores apply to them.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from glimmer_ray.data.batches import model_inputs
from glimmer_ray.data.stream import TokenizeBatch, TokenizeConfig
from glimmer_ray.eval.metrics import average, score_example


def dev_batches(
    paths_by_task: dict[str, str],
    tokenizer_dir: str,
    config: TokenizeConfig,
    batch_size: int,
    limit_per_task: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[dict[str, np.ndarray]]:
    """Tokenised batches of the retrieved dev files, read directly (no Ray), optionally one shard of
    them (`(rank, world_size)`: every rank gets the same number of batches, padded by repetition)."""
    tokenize = TokenizeBatch(tokenizer_dir, config)
    rows: list[dict[str, Any]] = []
    for task, path in sorted(paths_by_task.items()):
        table = pq.read_table(path).to_pylist()
        rows.extend(table[:limit_per_task] if limit_per_task else table)
    if not rows:
        raise ValueError("no dev examples to evaluate")
    rank, world_size = shard
    per_rank = -(-len(rows) // world_size)
    mine = [rows[(rank * per_rank + i) % len(rows)] for i in range(per_rank)]
    owned = [rank * per_rank + i < len(rows) for i in range(per_rank)]  # padding rows are not scored
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        batch = {key: np.array([row[key] for row in chunk], dtype=object) for key in chunk[0]}
        tokenized = tokenize(batch)
        tokenized["answers"] = batch["answers"]
        tokenized["owned"] = np.array(owned[start : start + batch_size])
        yield tokenized


def read_gold_evidence(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch with its k retrieved passages replaced by the g gold evidence passages the stream tokenised
    (`evidence_*`, a `TokenizeConfig` with evidence_passages > 0): the oracle reading, which measures the
    reader alone (retrieval and reranking aside), as a gold-evidence warm-up trains it."""
    if "evidence_ids" not in batch:
        raise ValueError(
            "reading the gold evidence needs batches tokenised with evidence_passages > 0 (evidence_ids / evidence_mask)"
        )
    return {
        **batch,
        "passage_ids": batch["evidence_ids"],
        "passage_mask": batch["evidence_mask"],
        "passage_keys": batch["evidence_keys"],
        "passage_pages": batch["evidence_pages"],
        # gold passages have no retriever score: a zero prior leaves the learned score alone, as in the warm-up
        "passage_scores": np.zeros(np.shape(batch["evidence_keys"]), dtype=np.float32),
    }


@torch.no_grad()
def predict(
    model,
    batches,
    tokenizer,
    max_new_tokens: int = 16,
    closed_book: bool = False,
    fixed_length: bool = False,
    num_selected: int | None = None,
    device: torch.device | None = None,
    memory=None,
    select_by: str = "reranker",
) -> list[dict[str, Any]]:
    """Greedy answers with the kept passages. `fixed_length` decodes every step (no early stop), which
    sharded ZeRO-3 evaluation needs: every rank must run the same number of forward passes.
    `select_by="retriever"` reads the retriever's first m instead of the reranker's top m.
    `memory` (a `MemoryStore` or `LRUMemoryCache`) supplies the passages' pre-computed memory instead
    of running the memory encoder over their tokens."""
    device = device or next(model.parameters()).device
    predictions = []
    with _eval_mode(model):
        for batch in batches:
            inputs = model_inputs(batch, device, closed_book=closed_book, eos_token_id=tokenizer.eos_token_id)
            passage_memory = None
            if memory is not None and not closed_book:
                passage_memory = stored_memory(memory, batch["passage_keys"], inputs["passage_mask"])
                inputs["passage_ids"] = None
            tokens, encoding = model.generate(
                inputs["question_ids"],
                inputs["question_mask"],
                inputs["passage_ids"],
                inputs["passage_mask"],
                passage_memory=passage_memory,
                num_selected=1 if closed_book else num_selected,  # closed book: the one empty passage
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens if fixed_length else 0,
                select_by=select_by,
                retrieval_scores=inputs.get("retrieval_scores"),
            )
            answers = tokenizer.batch_decode(
                _cut_at_eos(tokens[:, 1:], tokenizer.eos_token_id), skip_special_tokens=True
            )
            for row in range(len(answers)):
                if "owned" in batch and not batch["owned"][row]:
                    continue
                pages = [str(p) for p in batch["passage_pages"][row]]
                keys = [str(p) for p in batch["passage_keys"][row]]
                kept = [pages[i] for i in encoding.selected[row].tolist()] if not closed_book else []
                ranked = list(dict.fromkeys(kept + pages))
                order = (
                    torch.sort(encoding.rerank_scores[row], descending=True, stable=True).indices.tolist()
                    if encoding.rerank_scores is not None and not closed_book
                    else []
                )
                predictions.append(
                    {
                        "id": str(batch["id"][row]),
                        "task": str(batch["task"][row]),
                        "answer": answers[row].strip(),
                        "pages": ranked,
                        "gold_answers": [str(a) for a in batch["answers"][row]],
                        "gold_pages": json.loads(batch["gold_pages"][row]),
                        "gold_passages": json.loads(batch["gold_passages"][row]),
                        "kept_pages": kept,
                        "reranked_passages": [
                            keys[i] for i in order
                        ],  # all k by rerank score (empty without a reranker)
                    }
                )
    return predictions


@torch.no_grad()
def teacher_selection(model, batches, num_selected: int, device: torch.device | None = None) -> list[dict[str, Any]]:
    """The m passages the perplexity-distillation teacher ranks highest: each passage read alone, scored by the
    length-normalised log-likelihood of the gold answer (the pdist target). The reranker can learn no better
    ranking than this from distillation; its recall@m against the retriever's tells whether the reader is yet
    a teacher worth distilling. Returns one record per owned example with `task`, `gold_pages`, `kept_pages`, `gold_passages`,
    `reranked_passages` (all k passage ids in the teacher's order) and `retrieved_passages` (in the retriever's)."""
    device = device or next(model.parameters()).device
    selections = []
    with _eval_mode(model):
        for batch in batches:
            inputs = model_inputs(batch, device)
            target = model.passage_log_likelihood(
                inputs["question_ids"],
                inputs["question_mask"],
                inputs["passage_ids"],
                inputs["passage_mask"],
                None,
                inputs["labels"],
            )  # [b, k]
            ranking = torch.sort(target, dim=1, descending=True, stable=True).indices  # [b, k], ties: retriever order
            order = ranking[:, :num_selected]  # [b, m]
            for row in range(target.shape[0]):
                if "owned" in batch and not batch["owned"][row]:
                    continue
                pages = [str(p) for p in batch["passage_pages"][row]]
                keys = [str(p) for p in batch["passage_keys"][row]]
                selections.append(
                    {
                        "id": str(batch["id"][row]),
                        "task": str(batch["task"][row]),
                        "gold_pages": json.loads(batch["gold_pages"][row]),
                        "kept_pages": [pages[i] for i in order[row].tolist()],
                        "gold_passages": json.loads(batch["gold_passages"][row]),
                        "reranked_passages": [keys[i] for i in ranking[row].tolist()],
                        "retrieved_passages": keys,
                    }
                )
    return selections


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Dropout off for the block; the model's training mode restored after it, even on error."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def stored_memory(memory, passage_keys: np.ndarray, passage_mask: torch.Tensor) -> torch.Tensor:
    """passage_memory [b, k, lp, d] fetched by passage id; its mask must be the tokens' mask, or the
    store was built with another tokenisation (passage_tokens, tokenizer) than this evaluation's."""
    batch_size, num_passages, length = passage_mask.shape
    keys = [str(key) for row in passage_keys for key in row]
    advice = f"stored memory does not cover the same tokens as these passages (passage_tokens {length}): build the memory with the reader's data.passage_tokens and tokenizer"
    try:
        fetched, fetched_mask = memory.fetch(keys, length=length)
    except ValueError as error:
        raise ValueError(f"{advice} ({error})") from error
    if not np.array_equal(fetched_mask.reshape(batch_size, num_passages, length), passage_mask.cpu().numpy()):
        raise ValueError(advice)
    return torch.from_numpy(fetched).view(batch_size, num_passages, length, -1).to(passage_mask.device)  # [b, k, lp, d]


def _cut_at_eos(tokens: torch.Tensor, eos: int) -> list[list[int]]:
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


def score_predictions(predictions: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """KILT metrics per task and their macro average over tasks (`"average"`)."""
    by_task: dict[str, list[dict[str, float]]] = defaultdict(list)
    for prediction in predictions:
        by_task[prediction["task"]].append(
            score_example(
                prediction["answer"],
                prediction["gold_answers"],
                prediction["gold_pages"],
                prediction["pages"],
                ks=(1, 5),
            )
        )
    results = {task: {**average(scores), "count": len(scores)} for task, scores in sorted(by_task.items())}
    if results:
        keys = [key for key in next(iter(results.values())) if key != "count"]
        results["average"] = {key: float(np.mean([results[t][key] for t in by_task])) for key in keys}
        results["average"]["count"] = sum(len(s) for s in by_task.values())
    return results
