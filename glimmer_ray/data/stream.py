"""Ray Data from retrieved examples to tokenised reader batches, mixing tasks uniformly.

Each row becomes fixed-size arrays (padded, with masks), so `iter_torch_batches` needs no collate
function and `ray.train.get_dataset_shard` can split it across workers:

    question_ids  [lq]       question_mask  [lq]      "<task>: <input>", T5-tokenised
    passage_ids   [k, lp]    passage_mask   [k, lp]   "title: <title> context: <text>", top k
    passage_scores [k] float32                        the retriever's scores (a scorer's retrieval prior)
    labels        [t]        -100 after the answer's </s>
    task          str        gold_pages     json      (for the reranker's recall@m, page level)
    gold_passages json       ids of the passages holding each gold evidence item (passage level)
    passage_pages [k] str    passage_keys   [k] str   page and passage ids of the k passages
    evidence_ids  [g, lp]    evidence_mask  [g, lp]   the gold evidence passages (repeated up to g; the first g
    evidence_keys [g] str    evidence_pages [g] str   retrieved where an example has no evidence), when g > 0

Uniform task sampling as the paper trains: every task contributes the same number of rows to an
epoch (`rows_per_task`, default the largest task's size), smaller tasks repeated, all shuffled. The
order is fixed by the seed, the same in every epoch, so a resumed run finds its data position by
skipping the batches it had consumed; `Dataset.materialize()` (the train job's `data.cache`) then
costs nothing in randomness and spares each later epoch the read, shuffle and tokenisation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import ray
from transformers import AutoTokenizer

from glimmer_ray.data.reading import ReadingConfig, question_text, tokenize_passages


@dataclass(frozen=True)
class TokenizeConfig:
    question_tokens: int = 48  # lq (the paper: 48)
    passage_tokens: int = 304  # lp (the paper: 304)
    answer_tokens: int = 32  # t
    num_passages: int = 25  # k passages per example
    # g gold evidence passages per example (a two-hop evidence set has two); 0 = none tokenised
    evidence_passages: int = 0

    @classmethod
    def as_trained(
        cls, reading: ReadingConfig, num_passages: int | None = None, evidence_passages: int = 0
    ) -> TokenizeConfig:
        """The tokenisation a model was trained with (its reading.json), reading `num_passages` (None: its k)."""
        k = num_passages or reading.num_passages
        return cls(reading.question_tokens, reading.passage_tokens, reading.answer_tokens, k, evidence_passages)


class TokenizeBatch:
    """Ray Data callable class: loads the tokenizer once per actor, tokenises batches of rows."""

    def __init__(self, tokenizer_dir: str, config: TokenizeConfig) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.config = config

    def _encode(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        encoded = self.tokenizer(texts, max_length=length, truncation=True, padding="max_length", return_tensors="np")
        return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        config = self.config
        size = len(batch["id"])
        question_ids, question_mask = self._encode(
            [question_text(t, q) for t, q in zip(batch["task"], batch["input"])], config.question_tokens
        )
        texts = []
        for row in range(size):
            titles, bodies = list(batch["passage_titles"][row]), list(batch["passage_texts"][row])
            if len(titles) < config.num_passages:
                raise ValueError(
                    f"example {batch['id'][row]} has {len(titles)} retrieved passages, fewer than k = {config.num_passages}"
                )
            texts.extend(zip(titles[: config.num_passages], bodies[: config.num_passages]))
        passage_ids, passage_mask = tokenize_passages(self.tokenizer, *_columns(texts), config.passage_tokens)
        answers = [list(a)[0] if len(a) else "" for a in batch["answers"]]
        label_ids, label_mask = self._encode(answers, config.answer_tokens)
        labels = np.where(label_mask == 1, label_ids, -100)
        tokenized = {
            "id": batch["id"],
            "task": batch["task"],
            "gold_pages": batch["provenance"],
            "gold_passages": _required(batch, "gold_passages"),
            "question_ids": question_ids,
            "question_mask": question_mask,
            "passage_ids": passage_ids.reshape(size, config.num_passages, config.passage_tokens),
            "passage_mask": passage_mask.reshape(size, config.num_passages, config.passage_tokens),
            "passage_pages": np.array([list(p)[: config.num_passages] for p in batch["passage_pages"]], dtype=object),
            "passage_keys": np.array([list(p)[: config.num_passages] for p in batch["passage_ids"]], dtype=object),
            "passage_scores": np.array(
                [list(p)[: config.num_passages] for p in batch["passage_scores"]], dtype=np.float32
            ),
            "labels": labels,
        }
        if config.evidence_passages:  # only for a gold reader warm-up: g more passages to tokenise per example
            gold = [_required(batch, name) for name in ("gold_ids", "gold_page_ids", "gold_titles", "gold_texts")]
            retrieved = [batch[name] for name in ("passage_ids", "passage_pages", "passage_titles", "passage_texts")]
            evidence, keys, pages = [], [], []
            for row in range(size):
                chosen = list(zip(*(column[row] for column in gold))) or list(
                    zip(*(column[row] for column in retrieved))
                )
                chosen = (chosen * config.evidence_passages)[: config.evidence_passages]  # [g] (id, page, title, text)
                evidence.extend((title, body) for _, _, title, body in chosen)
                keys.append([str(key) for key, _, _, _ in chosen])
                pages.append([str(page) for _, page, _, _ in chosen])
            evidence_ids, evidence_mask = tokenize_passages(self.tokenizer, *_columns(evidence), config.passage_tokens)
            tokenized["evidence_ids"] = evidence_ids.reshape(size, config.evidence_passages, config.passage_tokens)
            tokenized["evidence_mask"] = evidence_mask.reshape(size, config.evidence_passages, config.passage_tokens)
            tokenized["evidence_keys"] = np.array(keys, dtype=object)  # [b, g]
            tokenized["evidence_pages"] = np.array(pages, dtype=object)  # [b, g]
        return tokenized


def _columns(pairs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(titles, texts) of (title, text) pairs."""
    return [title for title, _ in pairs], [text for _, text in pairs]


def _required(batch: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in batch:
        raise ValueError(
            f"the retrieved rows have no '{name}' column (written by an older build): "
            "rebuild the retrieved files with jobs/build_index.py (overwrite=true)"
        )
    return batch[name]


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(tokenizer_dir: str, config: TokenizeConfig) -> TokenizeBatch:
    return TokenizeBatch(tokenizer_dir, config)


def tokenize_rows(batch: dict[str, np.ndarray], tokenizer_dir: str, config: TokenizeConfig) -> dict[str, np.ndarray]:
    """Task-based form of `TokenizeBatch` (the tokenizer is loaded once per worker process): it fuses
    with the read, so the stream needs no CPU of its own beside the training workers."""
    return _cached_tokenizer(tokenizer_dir, config)(batch)


def mixed_task_dataset(
    paths_by_task: dict[str, str | list[str]], rows_per_task: int | None = None, seed: int = 0
) -> ray.data.Dataset:
    """Union of the tasks' retrieved Parquet files (one or several per task) with every task at `rows_per_task`
    rows, shuffled."""
    if not paths_by_task:
        raise ValueError("no task files given")
    datasets = {task: ray.data.read_parquet(path) for task, path in sorted(paths_by_task.items())}
    counts = {task: dataset.count() for task, dataset in datasets.items()}
    empty = [task for task, count in counts.items() if count == 0]
    if empty:
        raise ValueError(f"task file(s) without examples: {', '.join(empty)}")
    target = rows_per_task or max(counts.values())
    parts = []
    for task, dataset in datasets.items():
        repeats = math.ceil(target / counts[task])
        repeated = dataset if repeats == 1 else dataset.union(*[dataset] * (repeats - 1))
        parts.append(repeated.limit(target))
    mixed = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    shuffled = mixed.random_shuffle(seed=seed)
    # blocks of the union and the limit reach the shuffle in whatever order their tasks finish; a seeded shuffle
    # of differently ordered blocks is a different order, and a resumed run that skips the batches it consumed
    # needs the same one (this dataset's context only, not the process-wide one)
    shuffled.context.execution_options.preserve_order = True
    return shuffled


def tokenized_dataset(
    paths_by_task: dict[str, str | list[str]],
    tokenizer_dir: str,
    config: TokenizeConfig,
    rows_per_task: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> ray.data.Dataset:
    """The reader's training stream: mixed tasks, tokenised into fixed-size arrays."""
    return mixed_task_dataset(paths_by_task, rows_per_task, seed).map_batches(
        tokenize_rows,
        fn_kwargs={"tokenizer_dir": tokenizer_dir, "config": config},
        batch_size=batch_size,
        batch_format="numpy",
    )
