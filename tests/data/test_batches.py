"""Tokenised batches as model inputs."""

from __future__ import annotations

import numpy as np
import torch

from glimmer_ray.data.batches import model_inputs


def test_closed_book_inputs_hold_no_passage():
    batch = {
        "question_ids": np.ones((2, 3), dtype=np.int64),
        "question_mask": np.ones((2, 3), dtype=np.int64),
        "passage_ids": np.ones((2, 4, 5), dtype=np.int64),
        "passage_mask": np.ones((2, 4, 5), dtype=np.int64),
        "labels": np.full((2, 2), 7, dtype=np.int64),
    }
    inputs = model_inputs(batch, torch.device("cpu"))
    assert inputs["passage_ids"].shape == (2, 4, 5)
    closed = model_inputs(batch, torch.device("cpu"), closed_book=True, eos_token_id=1)
    assert closed["passage_ids"].tolist() == [[[1]], [[1]]] and closed["passage_mask"].shape == (2, 1, 1)
    # a scorer with a retrieval prior scores the one empty passage too: its retriever score is zero
    assert closed["retrieval_scores"].tolist() == [[0.0], [0.0]]
