"""FLOP formulas of the paper against FLOPs counted in a real forward pass.

Tolerance: the projections (every linear layer of encoder and decoder) must match the formulas
exactly (relative 1e-12). That holds when the feed-forward has 8 d^2 weights (gated, d_ff = 8 d / 3,
as in T5.1.1-base and the tiny configs here) and heads * d_kv = d. The formulas ignore attention
scores, the vocabulary projection and the scoring head; those are reported separately and checked
to be exactly what is left of the measured total.
"""

from __future__ import annotations

import pytest
import torch

from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.model.flops import formula_flops, measure_flops, measure_reader_flops, paper_formula

QUESTION_TOKENS, PASSAGE_TOKENS, TARGET_TOKENS = 6, 10, 3
PAIR_TOKENS = QUESTION_TOKENS + PASSAGE_TOKENS

SETTINGS = {
    "fid": dict(live_proportion=1.0, num_selected=None),
    "lumen": dict(live_proportion=0.5, num_selected=None),
    "glimmer": dict(live_proportion=0.5, rerank_proportion=0.5, num_selected=2),
}


def _inputs(model, batch_size=2, num_passages=5):
    question_ids = torch.randint(2, 200, (batch_size, QUESTION_TOKENS))
    passage_ids = torch.randint(2, 200, (batch_size, num_passages, PASSAGE_TOKENS))
    memory = model.encode_memory(
        passage_ids.view(-1, PASSAGE_TOKENS), torch.ones(batch_size * num_passages, PASSAGE_TOKENS, dtype=torch.long)
    )
    return (
        question_ids,
        torch.ones_like(question_ids),
        memory.view(batch_size, num_passages, PASSAGE_TOKENS, -1),
        torch.ones_like(passage_ids),
    )


@pytest.mark.parametrize("variant", list(SETTINGS))
def test_measured_projection_flops_equal_the_formulas(tiny_t5_dir, variant):
    model = GlimmerForConditionalGeneration.from_t5(tiny_t5_dir, **SETTINGS[variant]).eval()
    config = model.config
    assert config.d_ff * 3 == 8 * config.d_model and config.num_heads * config.d_kv == config.d_model
    measured = measure_reader_flops(model, *_inputs(model), target_tokens=TARGET_TOKENS)
    formula = formula_flops(
        config, num_passages=5, pair_tokens=PAIR_TOKENS, target_tokens=TARGET_TOKENS, question_tokens=QUESTION_TOKENS
    )
    assert measured.projections == pytest.approx(formula.total, rel=1e-12)
    # The printed formula (real-valued alpha and beta) gives the same number when layers split evenly.
    printed = paper_formula(
        variant,
        num_passages=5,
        pair_tokens=PAIR_TOKENS,
        target_tokens=TARGET_TOKENS,
        num_layers=config.num_layers,
        d_model=config.d_model,
        live_proportion=config.live_proportion,
        rerank_proportion=config.rerank_proportion,
        num_selected=config.num_selected,
    )
    assert formula.paper_total == pytest.approx(printed, rel=1e-12)
    assert measured.lm_head == TARGET_TOKENS * config.d_model * config.vocab_size
    assert measured.rerank_head == (5 * config.d_model if variant == "glimmer" else 0)
    assert measured.attention > 0


def test_formulas_order_fid_lumen_glimmer_as_in_figure_2():
    """The paper's Figure 2 settings at T5-base shape: FiD 5, LUMEN 10 (alpha 1/3), GLIMMER 25 -> 5."""
    shape = dict(pair_tokens=48 + 304, target_tokens=8, num_layers=12, d_model=768)
    fid = paper_formula("fid", num_passages=5, **shape)
    lumen = paper_formula("lumen", num_passages=10, live_proportion=1 / 3, **shape)
    glimmer = paper_formula(
        "glimmer", num_passages=25, num_selected=5, live_proportion=1 / 3, rerank_proportion=0.25, **shape
    )
    # hand-worked: per n_p L d^2, FiD 5 * 14 = 70, LUMEN 10 * (4 + 2) = 60, GLIMMER 5 * 6 + 20 * 1 = 50
    decoder = 8 * 12 * 14 * 768**2
    unit = 352 * 12 * 768**2
    assert fid == pytest.approx(70 * unit + decoder)
    assert lumen == pytest.approx(60 * unit + decoder)
    assert glimmer == pytest.approx(50 * unit + decoder)
    assert glimmer / fid == pytest.approx(0.715, abs=0.005)


def test_formula_rejects_m_above_k(tiny_t5_dir):
    from glimmer_ray.model import GlimmerConfig

    with pytest.raises(ValueError, match="m <= k"):
        formula_flops(GlimmerConfig(num_selected=6), num_passages=5, pair_tokens=10, target_tokens=2, question_tokens=4)
    with pytest.raises(ValueError, match="unknown variant"):
        paper_formula("rag", num_passages=1, pair_tokens=1, target_tokens=1, num_layers=1, d_model=1)


def test_measure_flops_counts_a_plain_linear_layer():
    layer = torch.nn.Linear(8, 4, bias=False)
    measured, result = measure_flops(layer, layer, torch.zeros(3, 8))
    assert result.shape == (3, 4)
    assert measured.total == 3 * 8 * 4  # multiply-adds
