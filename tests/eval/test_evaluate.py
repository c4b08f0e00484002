"""Reading the gold evidence (the oracle that measures the reader alone) in place of the retrieved passages."""

from __future__ import annotations

import numpy as np
import pytest

from glimmer_ray.eval.evaluate import read_gold_evidence


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "passage_ids": rng.integers(3, 250, size=(3, 4, 8)),
        "passage_mask": np.ones((3, 4, 8), dtype=np.int64),
        "evidence_ids": rng.integers(3, 250, size=(3, 2, 8)),
        "evidence_mask": np.ones((3, 2, 8), dtype=np.int64),
        "passage_keys": np.array([[f"{100 + i}_{j}" for j in range(4)] for i in range(3)], dtype=object),
        "passage_pages": np.array([[f"{100 + i}" for j in range(4)] for i in range(3)], dtype=object),
        "evidence_keys": np.array([["7_1", "7_1"], ["7_0", "12_3"], ["102_0", "102_1"]], dtype=object),
        "evidence_pages": np.array([["7", "7"], ["7", "12"], ["102", "102"]], dtype=object),
    }


def test_the_gold_evidence_replaces_the_retrieved_passages_with_its_ids_and_pages():
    batch = _batch()
    gold = read_gold_evidence(batch)
    assert np.array_equal(gold["passage_ids"], batch["evidence_ids"]) and np.array_equal(
        gold["passage_mask"], batch["evidence_mask"]
    )
    assert (
        gold["passage_keys"].tolist() == batch["evidence_keys"].tolist()
    )  # memory and recall look the evidence up by these
    assert gold["passage_pages"].tolist() == batch["evidence_pages"].tolist()
    assert (
        batch["passage_ids"].shape == (3, 4, 8) and batch["passage_keys"][0, 0] == "100_0"
    )  # the input batch is not changed


def test_batches_without_evidence_are_refused():
    batch = _batch()
    del batch["evidence_ids"]
    with pytest.raises(ValueError, match="evidence_passages > 0"):
        read_gold_evidence(batch)
