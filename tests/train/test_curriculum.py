"""The training curriculum: reader warm-up (retrieved or gold passages), distillation, reranker selection."""

from __future__ import annotations

import pytest
import torch

from glimmer_ray.data.batches import model_inputs
from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.train.config import OptimSection
from glimmer_ray.train.curriculum import curriculum_step


def _inputs(num_passages=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    question_ids = torch.randint(2, 256, (2, 6), generator=generator)
    passage_ids = torch.randint(2, 256, (2, num_passages, 9), generator=generator)
    return {
        "question_ids": question_ids,
        "question_mask": torch.ones_like(question_ids),
        "passage_ids": passage_ids,
        "passage_mask": torch.ones_like(passage_ids),
        "labels": torch.randint(2, 256, (2, 5), generator=generator),
    }


def test_curriculum_reads_the_first_passage_then_distils_then_reranks(tiny_t5_dir):
    """reader warm-up (steps 0-1): FiD over the retriever's first passage only, no distillation; steps 2-3:
    distillation while the retriever's first m are read; from step 4 the reranker's top m."""
    glimmer = GlimmerForConditionalGeneration.from_t5(
        tiny_t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=2
    ).eval()
    lumen = GlimmerForConditionalGeneration.from_t5(tiny_t5_dir, live_proportion=0.5).eval()
    optim = OptimSection(
        reader_warmup_steps=2, reader_warmup_passages=1, distill_start_step=2, rerank_warmup_steps=4, pdist_weight=0.5
    )
    inputs = _inputs()

    warm, arguments, reader_warmup = curriculum_step(inputs, 1, optim)
    assert (
        reader_warmup
        and warm["passage_ids"].shape == (2, 1, 9)
        and torch.equal(warm["passage_ids"][:, 0], inputs["passage_ids"][:, 0])
    )
    output = glimmer(**warm, **arguments)
    first_only = lumen(
        inputs["question_ids"],
        inputs["question_mask"],
        inputs["passage_ids"][:, :1],
        inputs["passage_mask"][:, :1],
        labels=inputs["labels"],
    )
    torch.testing.assert_close(output.logits, first_only.logits, rtol=1e-5, atol=1e-4)
    assert output.pdist_loss is None and output.loss.item() == pytest.approx(output.lm_loss.item())

    distil, arguments, reader_warmup = curriculum_step(inputs, 2, optim)
    output = glimmer(**distil, **arguments)
    assert not reader_warmup and distil["passage_ids"].shape == (2, 4, 9)
    assert output.selected.tolist() == [[0, 1], [0, 1]] and output.pdist_loss is not None
    assert output.loss.item() == pytest.approx(output.lm_loss.item() + 0.5 * output.pdist_loss.item(), rel=1e-5)

    rerank, arguments, _ = curriculum_step(inputs, 4, optim)
    output = glimmer(**rerank, **arguments)
    assert output.selected.tolist() == torch.topk(output.rerank_scores, 2, dim=1).indices.tolist()


def test_gold_reader_warmup_reads_the_evidence_passages_then_the_retrieved_ones(tiny_t5_dir):
    glimmer = GlimmerForConditionalGeneration.from_t5(
        tiny_t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=2
    ).eval()
    lumen = GlimmerForConditionalGeneration.from_t5(tiny_t5_dir, live_proportion=0.5).eval()
    optim = OptimSection(reader_warmup_steps=1, reader_warmup_source="gold", pdist_weight=1.0)
    inputs = _inputs()
    evidence = torch.randint(2, 256, (2, 2, 7), generator=torch.Generator().manual_seed(1))
    inputs = {**inputs, "evidence_ids": evidence, "evidence_mask": torch.ones_like(evidence)}

    warm, arguments, reader_warmup = curriculum_step(inputs, 0, optim)
    assert reader_warmup and set(warm) == {"question_ids", "question_mask", "passage_ids", "passage_mask", "labels"}
    assert (
        torch.equal(warm["passage_ids"], evidence)
        and arguments["num_selected"] == 2
        and arguments["pdist_weight"] == 0.0
    )
    output = glimmer(**warm, **arguments)
    gold_only = lumen(
        inputs["question_ids"], inputs["question_mask"], evidence, torch.ones_like(evidence), labels=inputs["labels"]
    )
    torch.testing.assert_close(output.logits, gold_only.logits, rtol=1e-5, atol=1e-4)

    assert "evidence_ids" in inputs  # the caller's inputs are left as they were
    after, arguments, reader_warmup = curriculum_step(
        inputs, 1, optim
    )  # the evidence is dropped, the k retrieved are read
    assert (
        not reader_warmup and "evidence_ids" not in after and torch.equal(after["passage_ids"], inputs["passage_ids"])
    )
    assert glimmer(**after, **arguments).pdist_loss is not None
    with pytest.raises(ValueError, match="needs the stream's evidence_ids"):
        curriculum_step(_inputs(), 0, optim)


def test_closed_book_never_distils_and_reader_warmup_must_fit_k():
    optim = OptimSection(reader_warmup_steps=10, reader_warmup_passages=3)
    closed = model_inputs(
        {key: value.numpy() for key, value in _inputs().items()}, torch.device("cpu"), closed_book=True, eos_token_id=1
    )
    same, arguments, reader_warmup = curriculum_step(closed, 0, optim, closed_book=True)
    assert not reader_warmup and same["passage_ids"].shape == (2, 1, 1)
    assert arguments["num_selected"] == 1 and arguments["pdist_weight"] == 0.0
    with pytest.raises(ValueError, match="reader_warmup_passages must be between 1 and k = 2"):
        curriculum_step(_inputs(num_passages=2), 0, optim)


def test_closed_gate_holds_distillation_and_reranking_back(tiny_t5_dir):
    """optim.distill_gate: until an evaluation finds the teacher at the retriever's level, steps past
    distill_start_step and rerank_warmup_steps neither distil nor read the reranker's picks."""
    glimmer = GlimmerForConditionalGeneration.from_t5(
        tiny_t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=2, retrieval_prior=True
    ).eval()
    optim = OptimSection(distill_start_step=0, rerank_warmup_steps=0, distill_gate=True)
    inputs = {**_inputs(), "retrieval_scores": torch.tensor([[0.1, 0.2, 0.9, 0.3], [0.8, 0.1, 0.2, 0.7]])}
    closed, arguments, _ = curriculum_step(inputs, 10, optim, gate_open=False)
    output = glimmer(**closed, **arguments)
    assert output.pdist_loss is None and output.selected.tolist() == [[0, 1], [0, 1]]  # the retriever's first m
    opened, arguments, _ = curriculum_step(inputs, 10, optim, gate_open=True)
    output = glimmer(**opened, **arguments)
    assert output.pdist_loss is not None and output.selected.tolist() == [[2, 3], [0, 3]]  # by score: the prior


def test_reader_warmup_keeps_the_retrieval_scores_of_the_passages_it_reads():
    optim = OptimSection(reader_warmup_steps=5, reader_warmup_passages=2)
    inputs = {**_inputs(), "retrieval_scores": torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.2]])}
    warm, _, _ = curriculum_step(inputs, 0, optim)
    torch.testing.assert_close(warm["retrieval_scores"], torch.tensor([[0.9, 0.8], [0.5, 0.4]]))
    gold = OptimSection(reader_warmup_steps=5, reader_warmup_source="gold")
    evidence = {"evidence_ids": inputs["passage_ids"][:, :3], "evidence_mask": inputs["passage_mask"][:, :3]}
    warm, _, _ = curriculum_step({**inputs, **evidence}, 0, gold)
    assert warm["retrieval_scores"].shape == (2, 3) and not warm["retrieval_scores"].any()
