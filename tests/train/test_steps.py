"""Training-step pieces: the DeepSpeed config, batch conversion, reranker recall."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glimmer_ray.train.steps import deepspeed_config, model_inputs, reranker_recall, retriever_recall


def test_deepspeed_config_sections():
    config = deepspeed_config(micro_batch_size=4, gradient_accumulation_steps=2, zero_stage=3, offload_optimizer=True, bf16=True)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["zero_optimization"]["stage"] == 3 and config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["bf16"] == {"enabled": True} and config["optimizer"]["type"] == "AdamW"
    adafactor = deepspeed_config(micro_batch_size=1, optimizer="adafactor")
    assert "optimizer" not in adafactor and adafactor["zero_allow_untested_optimizer"] is True
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(1, zero_stage=4)
    with pytest.raises(ValueError, match="parameter offload needs ZeRO stage 3"):
        deepspeed_config(1, zero_stage=2, offload_parameters=True)
    with pytest.raises(ValueError, match="optimizer"):
        deepspeed_config(1, optimizer="sgd")


def test_reranker_recall_needs_a_complete_evidence_set():
    pages = np.array([["a", "b", "c", "d"], ["a", "b", "c", "d"]], dtype=object)
    gold = np.array([json.dumps([["c"]]), json.dumps([["a", "d"]])], dtype=object)
    assert reranker_recall(torch.tensor([[2, 0], [0, 1]]), pages, gold) == 0.5  # ex 1 keeps a but not d
    assert reranker_recall(torch.tensor([[1, 0], [3, 0]]), pages, gold) == 0.5
    assert retriever_recall(2, pages, gold) == 0.0 and retriever_recall(4, pages, gold) == 1.0


def test_closed_book_inputs_hold_no_passage():
    batch = {
        "question_ids": np.ones((2, 3), dtype=np.int64), "question_mask": np.ones((2, 3), dtype=np.int64),
        "passage_ids": np.ones((2, 4, 5), dtype=np.int64), "passage_mask": np.ones((2, 4, 5), dtype=np.int64),
        "labels": np.full((2, 2), 7, dtype=np.int64),
    }
    inputs = model_inputs(batch, torch.device("cpu"))
    assert inputs["passage_ids"].shape == (2, 4, 5)
    closed = model_inputs(batch, torch.device("cpu"), closed_book=True, eos_token_id=1)
    assert closed["passage_ids"].tolist() == [[[1]], [[1]]] and closed["passage_mask"].shape == (2, 1, 1)
