"""The training worker's model construction (a random T5.1.1, a T5 checkpoint, or a GLIMMER export continued) and
its metrics window."""

from __future__ import annotations

import os

import pytest
import torch

from glimmer_ray.config import load_config
from glimmer_ray.data.tokenizer import save_tokenizer, train_t5_tokenizer
from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.model.random_t5 import random_t5, t5_1_1_config
from glimmer_ray.train.config import TrainConfig
from glimmer_ray.train.step_timing import random_batch
from glimmer_ray.train.worker import MetricsWindow, build_model, build_training_model, check_checkpoint_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(**overrides) -> TrainConfig:
    return load_config(
        TrainConfig,
        os.path.join(ROOT, "jobs", "configs", "train_quickstart.yaml"),
        [f"{key}={value}" for key, value in overrides.items()],
    )


def test_a_glimmer_export_continues_with_its_weights_and_the_configured_split(tmp_path):
    t5 = random_t5(t5_1_1_config(vocab_size=64, d_model=32, num_layers=6, num_heads=2, dropout_rate=0.1), seed=3)
    exported = GlimmerForConditionalGeneration.from_t5(
        t5, live_proportion=1 / 3, rerank_proportion=0.25, num_selected=2
    )
    with torch.no_grad():
        exported.rerank_head.proj.weight.normal_()  # a trained scoring head, unlike from_t5's fresh one
    exported.save_pretrained(tmp_path / "export")

    model = build_model(
        _config(**{"model.checkpoint": tmp_path / "export", "model.num_selected": 3, "model.live_proportion": 0.5}),
        vocab_size=64,
    )
    assert model.config.num_selected == 3 and model.config.live_proportion == 0.5  # as configured now
    saved = exported.state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())  # every weight carried over
    assert model.config.dropout_rate == 0.1

    with pytest.raises(ValueError, match="separate_question_encoder=False"):
        build_model(
            _config(**{"model.checkpoint": tmp_path / "export", "model.separate_question_encoder": "true"}),
            vocab_size=64,
        )


def test_a_t5_checkpoint_gets_a_fresh_scoring_head(tmp_path):
    t5 = random_t5(t5_1_1_config(vocab_size=64, d_model=32, num_layers=6, num_heads=2), seed=3)
    t5.save_pretrained(tmp_path / "t5")
    model = build_model(_config(**{"model.checkpoint": tmp_path / "t5"}), vocab_size=64)
    assert torch.equal(
        model.memory_blocks[0].layer[0].SelfAttention.q.weight, t5.encoder.block[0].layer[0].SelfAttention.q.weight
    )
    assert model.config.num_selected == 3


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    """Every T5 block (memory, live, decoder) recomputed in backward: the same loss and gradients as holding the
    activations, dropout included (its random state is replayed), with the distillation teacher in the step."""
    random_t5(t5_1_1_config(vocab_size=64, d_model=32, num_layers=6, num_heads=2, dropout_rate=0.1)).save_pretrained(
        tmp_path / "t5"
    )
    batch = random_batch(2, 4, 6, 10, 4, 64, seed=0)
    results = []
    for checkpointed in (False, True):
        config = _config(**{"model.checkpoint": tmp_path / "t5", "optim.activation_checkpointing": checkpointed})
        torch.manual_seed(1)  # the same fresh scoring head
        model = build_training_model(config, vocab_size=64, device=torch.device("cpu"))
        blocks = [*model.encoder.block, *model.decoder.block]
        assert all(block.gradient_checkpointing == checkpointed for block in blocks)
        torch.manual_seed(2)  # the same dropout
        output = model(**batch, pdist_weight=1.0)
        output.loss.backward()
        results.append((output.loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (loss, grads), (loss_checkpointed, grads_checkpointed) = results
    assert torch.equal(loss, loss_checkpointed)
    assert grads.keys() == grads_checkpointed.keys() and all(
        torch.allclose(grads[name], grads_checkpointed[name], rtol=1e-5, atol=1e-7) for name in grads
    )
    assert sum(grad.abs().sum() for grad in grads.values()) > 0


def test_a_checkpoint_saved_with_another_tokenizer_is_refused(tmp_path):
    texts = ["Brae Kor was born in Tesh.", "Tesh is a city in Vorn.", "nq: title: context:"]
    data_tokenizer = save_tokenizer(train_t5_tokenizer(texts, vocab_size=120), tmp_path / "data" / "tokenizer")
    t5 = random_t5(t5_1_1_config(vocab_size=120, d_model=32, num_layers=2, num_heads=2), seed=3)
    t5.save_pretrained(tmp_path / "bare")
    check_checkpoint_tokenizer(str(tmp_path / "bare"), data_tokenizer)  # no tokenizer saved: trusted
    t5.save_pretrained(tmp_path / "same")
    train_t5_tokenizer(texts, vocab_size=120).save_pretrained(tmp_path / "same")
    check_checkpoint_tokenizer(str(tmp_path / "same"), data_tokenizer)
    t5.save_pretrained(tmp_path / "other")
    train_t5_tokenizer(texts + ["Quaeth Drinx founded the Zoum Works."], vocab_size=120).save_pretrained(
        tmp_path / "other"
    )
    with pytest.raises(ValueError, match="another tokenizer.*tokenizer_dir="):
        check_checkpoint_tokenizer(str(tmp_path / "other"), data_tokenizer)


def test_metrics_window_means_each_value_over_the_batches_that_gave_it():
    window = MetricsWindow()
    window.add(10, loss=2.0, reranker_recall=1.0)
    window.add(20, loss=4.0)  # a reader warm-up batch: nothing ranked
    window.add(30, loss=0.0, reranker_recall=0.0)
    assert window.batches == 3 and window.tokens == 60
    assert window.mean("loss") == 2.0 and window.mean("reranker_recall") == 0.5
    means = window.means(["reranker_recall", "loss", "pdist_target_max_prob"])  # never distilled: left out
    assert list(means.items()) == [("reranker_recall", 0.5), ("loss", 2.0)]
    start = window.start
    window.reset()
    assert window.batches == window.tokens == 0 and window.means(["loss"]) == {} and window.start >= start
