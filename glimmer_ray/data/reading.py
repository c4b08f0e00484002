"""How the reader reads: the text templates of its inputs, the one tokenisation of passages, and the
"as trained" settings saved with every exported model.

A reader is trained on questions cut to `question_tokens`, passages cut and padded to `passage_tokens`
and answers of at most `answer_tokens`, for a fixed task list, with `num_passages` (k) retrieved
passages an example. Everything that reads the model later (evaluation, benchmarks, the memory build,
the Serve app) must tokenise the same way, so the training job writes these settings beside the model
(`reading.json`) and `load_reading` reads them back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

READING_FILE = "reading.json"
QUESTION_TEMPLATE = "{task}: {question}"
PASSAGE_TEMPLATE = "title: {title} context: {text}"


def question_text(task: str, question: str) -> str:
    """What the reader reads for a question: its task prefix, then the question."""
    return QUESTION_TEMPLATE.format(task=task, question=question)


def passage_text(title: str, text: str) -> str:
    """What the reader (memory and live encoders) reads for a passage."""
    return PASSAGE_TEMPLATE.format(title=title, text=text)


def parse_passage_text(passage: str) -> tuple[str, str]:
    """(title, text) of a string `passage_text` wrote, e.g. a passage decoded from its tokens."""
    prefix, rest = PASSAGE_TEMPLATE.split("{title}")
    separator = rest.split("{text}")[0]
    title, _, text = passage.partition(separator)
    return title.removeprefix(prefix).strip(), text


def tokenize_passages(
    tokenizer, titles: Sequence[str], texts: Sequence[str], passage_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, int64 [n, passage_tokens], of passages as the reader reads them:
    the passage template, cut and padded to `passage_tokens` (training, evaluation and the memory build
    all tokenise passages here, so stored memory equals the memory computed from these ids)."""
    encoded = tokenizer(
        [passage_text(title, text) for title, text in zip(titles, texts)],
        max_length=passage_tokens,
        truncation=True,
        padding="max_length",
        return_tensors="np",
    )
    return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)


@dataclass(frozen=True)
class ReadingConfig:
    """The tokenisation a reader was trained with, saved beside it as `reading.json`."""

    question_tokens: int  # lq
    passage_tokens: int  # lp
    answer_tokens: int  # t: answer tokens trained on, the default greedy length
    num_passages: int  # k retrieved passages an example
    tasks: tuple[str, ...]  # task prefixes trained on
    question_template: str = QUESTION_TEMPLATE
    passage_template: str = PASSAGE_TEMPLATE


def save_reading(directory: str, reading: ReadingConfig) -> str:
    """Write `reading.json` into a model directory; returns its path."""
    path = os.path.join(directory, READING_FILE)
    with open(path, "w") as handle:
        json.dump({**dataclasses.asdict(reading), "tasks": list(reading.tasks)}, handle, indent=2)
    return path


def load_reading(model_dir: str) -> ReadingConfig:
    """The settings a model directory was trained with. Errors name what is wrong: a directory without
    `reading.json` (not exported by jobs/train.py) or templates this version does not read with."""
    path = os.path.join(model_dir, READING_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: {model_dir} was not exported by jobs/train.py, which saves the token lengths, k and tasks "
            f"it trained with; write one with glimmer_ray.data.reading.save_reading"
        )
    with open(path) as handle:
        saved = json.load(handle)
    fields = {field.name for field in dataclasses.fields(ReadingConfig)}
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}")
    reading = ReadingConfig(**{**saved, "tasks": tuple(saved["tasks"])})
    if (reading.question_template, reading.passage_template) != (QUESTION_TEMPLATE, PASSAGE_TEMPLATE):
        raise ValueError(
            f"{path}: the model was trained with the templates {reading.question_template!r} / {reading.passage_template!r}, "
            f"but this version reads with {QUESTION_TEMPLATE!r} / {PASSAGE_TEMPLATE!r}"
        )
    return reading
