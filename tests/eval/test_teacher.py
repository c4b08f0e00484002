"""The distillation teacher's ranking: every passage read alone, ranked by the gold answer's likelihood."""

from __future__ import annotations

import json

import numpy as np
import torch
from transformers import T5ForConditionalGeneration

from glimmer_ray.eval.evaluate import teacher_selection
from glimmer_ray.model import GlimmerForConditionalGeneration


def _batch(batch_size: int = 3, num_passages: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    passage_mask = np.ones((batch_size, num_passages, 12), dtype=np.int64)
    passage_mask[:, :, 9:] = 0  # padded passages
    labels = rng.integers(3, 250, size=(batch_size, 4))
    labels[0, 3] = -100
    return {
        "id": np.array([f"q{i}" for i in range(batch_size)]),
        "task": np.array(["nq"] * batch_size),
        "question_ids": rng.integers(3, 250, size=(batch_size, 6)),
        "question_mask": np.ones((batch_size, 6), dtype=np.int64),
        "passage_ids": rng.integers(3, 250, size=(batch_size, num_passages, 12)) * passage_mask,
        "passage_mask": passage_mask,
        "labels": labels,
        "passage_pages": np.array(
            [[f"page{i}-{j}" for j in range(num_passages)] for i in range(batch_size)], dtype=object
        ),
        "gold_pages": np.array([json.dumps([[f"page{i}-2"]]) for i in range(batch_size)]),
        "passage_keys": np.array(
            [[f"page{i}-{j}_0" for j in range(num_passages)] for i in range(batch_size)], dtype=object
        ),
        "gold_passages": np.array([json.dumps([[[f"page{i}-2_0"]]]) for i in range(batch_size)]),
    }


def test_teacher_keeps_the_passages_that_alone_best_explain_the_answer(tiny_t5_dir):
    model = GlimmerForConditionalGeneration.from_t5(
        T5ForConditionalGeneration.from_pretrained(tiny_t5_dir),
        live_proportion=0.5,
        rerank_proportion=0.5,
        num_selected=2,
    ).eval()
    batch = _batch()
    selections = teacher_selection(model, [batch], num_selected=2)
    inputs = {
        key: torch.as_tensor(batch[key])
        for key in ("question_ids", "question_mask", "passage_ids", "passage_mask", "labels")
    }
    for row, selection in enumerate(selections):
        # reference: one reader call per passage, the reader holding that passage only (k = 1)
        alone = [
            model.passage_log_likelihood(
                inputs["question_ids"][row : row + 1],
                inputs["question_mask"][row : row + 1],
                inputs["passage_ids"][row : row + 1, i : i + 1],
                inputs["passage_mask"][row : row + 1, i : i + 1],
                None,
                inputs["labels"][row : row + 1],
            ).item()
            for i in range(5)
        ]
        order = np.argsort(alone, kind="stable")[::-1]
        assert selection["kept_pages"] == [f"page{row}-{i}" for i in order[:2]]
        assert selection["reranked_passages"] == [
            f"page{row}-{i}_0" for i in order
        ]  # all k, for passage recall at any cut-off
        assert selection["id"] == f"q{row}" and selection["gold_pages"] == [[f"page{row}-2"]]
        assert selection["gold_passages"] == [[[f"page{row}-2_0"]]]
    assert all(len(s["kept_pages"]) == 2 for s in selections) and len(selections) == 3


def test_padding_rows_are_not_returned(tiny_t5_dir):
    model = GlimmerForConditionalGeneration.from_t5(
        T5ForConditionalGeneration.from_pretrained(tiny_t5_dir),
        live_proportion=0.5,
        rerank_proportion=0.5,
        num_selected=2,
    ).eval()
    batch = _batch()
    batch["owned"] = np.array([True, False, True])
    model.train()
    assert [s["id"] for s in teacher_selection(model, [batch], num_selected=1)] == ["q0", "q2"]
    assert model.training  # scored with dropout off, handed back in training mode
