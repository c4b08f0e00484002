"""From-scratch T5.1.1 starts sane: its first LM loss on random tokens is that of a uniform guess, ln(V), not
sqrt(d_model) times larger as with Hugging Face's std-1.0 output layer; the untied output layer survives saving."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import T5ForConditionalGeneration

from glimmer_ray.model.random_t5 import TIED_EMBEDDINGS, random_t5, save_random_t5, t5_1_1_config


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("d_model", [64, 512])
def test_first_lm_loss_is_near_ln_vocab(d_model, tied):
    vocab = 4000
    extra = TIED_EMBEDDINGS if tied else {}
    model = random_t5(
        t5_1_1_config(vocab_size=vocab, d_model=d_model, num_layers=2, num_heads=4, dropout_rate=0.0, **extra)
    )
    assert (model.lm_head.weight is model.shared.weight) == tied
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(2, vocab, (8, 32), generator=generator)
    labels = torch.randint(2, vocab, (8, 16), generator=generator)
    with torch.no_grad():
        loss = model(input_ids=inputs, labels=labels).loss.item()
    assert abs(loss - math.log(vocab)) < 1.0, f"first loss {loss:.2f} at d {d_model}, ln(V) = {math.log(vocab):.2f}"


def test_a_tied_reader_saves_loads_and_keeps_its_tie_through_glimmer(tmp_path):
    from glimmer_ray.model import GlimmerForConditionalGeneration

    config = t5_1_1_config(vocab_size=300, d_model=48, num_layers=2, num_heads=4, **TIED_EMBEDDINGS)
    glimmer = GlimmerForConditionalGeneration.from_t5(random_t5(config, seed=3), num_selected=None)
    assert glimmer.config.lm_head_tied and glimmer.lm_head.weight is glimmer.shared.weight
    glimmer.save_pretrained(tmp_path / "glimmer")
    loaded = GlimmerForConditionalGeneration.from_pretrained(tmp_path / "glimmer")
    assert loaded.lm_head.weight is loaded.shared.weight and torch.equal(loaded.shared.weight, glimmer.shared.weight)


def test_the_untied_output_layer_is_saved_and_loaded(tmp_path):
    config = t5_1_1_config(vocab_size=300, d_model=48, num_layers=2, num_heads=4)
    model = random_t5(config, seed=3)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert model.lm_head.weight.std().item() == pytest.approx(48**-0.5, rel=0.05)
    loaded = T5ForConditionalGeneration.from_pretrained(save_random_t5(tmp_path / "t5", config, seed=3))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(loaded.lm_head.weight, loaded.shared.weight)
