"""GLIMMER against Hugging Face T5: the encoder split, memory, fusion, reranking, losses, checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, T5ForConditionalGeneration

from glimmer_ray.model import GlimmerConfig, GlimmerForConditionalGeneration, perplexity_distillation_loss
from glimmer_ray.model.modeling import CPU_LIVE_CHUNK_TOKENS, resolve_chunk_tokens

VOCAB = 256


def _random_batch(batch_size=2, num_passages=4, question_length=6, passage_length=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    question_ids = torch.randint(2, VOCAB, (batch_size, question_length), generator=generator)
    passage_ids = torch.randint(2, VOCAB, (batch_size, num_passages, passage_length), generator=generator)
    labels = torch.randint(2, VOCAB, (batch_size, 5), generator=generator)
    return question_ids, torch.ones_like(question_ids), passage_ids, torch.ones_like(passage_ids), labels


@pytest.fixture(scope="module")
def hf_t5(tiny_t5_dir) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration.from_pretrained(tiny_t5_dir).eval()


def _glimmer(tiny_t5_dir, **options) -> GlimmerForConditionalGeneration:
    return GlimmerForConditionalGeneration.from_t5(tiny_t5_dir, **options).eval()


def _assert_float32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Same weights, same operations, different fusion of sums: differences stay at float32 rounding
    # level relative to the magnitude of the values (random T5.1.1 logits reach the hundreds).
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= 1e-6 * scale + 1e-6


# ---- the encoder split against Hugging Face ---------------------------------------------------


def test_fid_setting_matches_hf_t5_on_concatenated_tokens(tiny_t5_dir, hf_t5):
    model = _glimmer(tiny_t5_dir)  # alpha = 1, no reranking: FiD
    question_ids, question_mask, passage_ids, passage_mask, labels = _random_batch(num_passages=1)
    output = model(question_ids, question_mask, passage_ids, passage_mask, labels=labels)
    concatenated = torch.cat([question_ids, passage_ids[:, 0]], dim=1)
    reference = hf_t5(input_ids=concatenated, attention_mask=torch.ones_like(concatenated), labels=labels)
    _assert_float32_close(output.logits, reference.logits)
    assert output.lm_loss.item() == pytest.approx(reference.loss.item(), rel=1e-5)


def test_padded_question_reads_like_the_unpadded_string(tiny_t5_dir, hf_t5):
    """Question padding must not shift the passage's relative positions."""
    model = _glimmer(tiny_t5_dir)
    question_ids, question_mask, passage_ids, passage_mask, labels = _random_batch(num_passages=1)
    question_mask[0, 4:] = 0  # example 0 has a 4-token question
    passage_mask[1, 0, 7:] = 0  # example 1 has a 7-token passage
    output = model(question_ids, question_mask, passage_ids, passage_mask, labels=labels)
    for example in range(2):
        tokens = torch.cat(
            [question_ids[example][question_mask[example] == 1], passage_ids[example, 0][passage_mask[example, 0] == 1]]
        )
        reference = hf_t5(input_ids=tokens[None], labels=labels[example : example + 1])
        _assert_float32_close(output.logits[example : example + 1], reference.logits)


def _reference_split_encoder(hf_t5, num_memory_layers, question_ids, passage_ids):
    """Assembled directly from HF's blocks: memory blocks over Q alone and over P alone, concatenated,
    the remaining blocks over the concatenation, then the final layer norm."""
    blocks = hf_t5.encoder.block

    def stack(hidden, indices):
        # as T5Stack: block 0's bias for this sequence, reused by every block of the run
        bias = blocks[0].layer[0].SelfAttention.compute_bias(hidden.shape[1], hidden.shape[1])
        for index in indices:
            hidden = blocks[index](hidden, None, bias)[0]
        return hidden

    question = stack(hf_t5.shared(question_ids), range(num_memory_layers))
    passage = stack(hf_t5.shared(passage_ids), range(num_memory_layers))
    live = stack(torch.cat([question, passage], dim=1), range(num_memory_layers, len(blocks)))
    return hf_t5.encoder.final_layer_norm(live)


@pytest.mark.parametrize("live_proportion", [0.5, 0.25, 0.0])
def test_split_encoder_matches_reference_from_hf_blocks(tiny_t5_dir, hf_t5, live_proportion):
    model = _glimmer(tiny_t5_dir, live_proportion=live_proportion)
    question_ids, question_mask, passage_ids, passage_mask, _ = _random_batch(batch_size=1, num_passages=2)
    encoding = model.encode(question_ids, question_mask, passage_ids, passage_mask)
    length = question_ids.shape[1] + passage_ids.shape[2]
    for passage in range(2):
        reference = _reference_split_encoder(
            hf_t5, model.config.num_memory_layers, question_ids, passage_ids[:, passage]
        )
        actual = encoding.hidden[:, passage * length : (passage + 1) * length]
        _assert_float32_close(actual, reference)


def test_hf_t5_encoder_agrees_with_split_reference_at_alpha_one(hf_t5):
    """The reference helper itself: with no memory layers it is HF's own encoder."""
    question_ids, _, passage_ids, _, _ = _random_batch(batch_size=1, num_passages=1)
    tokens = torch.cat([question_ids, passage_ids[:, 0]], dim=1)
    reference = _reference_split_encoder(hf_t5, 0, question_ids, passage_ids[:, 0])
    _assert_float32_close(reference, hf_t5.encoder(input_ids=tokens).last_hidden_state)


def test_forward_from_memory_equals_forward_from_ids(tiny_t5_dir):
    model = _glimmer(tiny_t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=2)
    question_ids, question_mask, passage_ids, passage_mask, labels = _random_batch()
    from_ids = model(question_ids, question_mask, passage_ids=passage_ids, passage_mask=passage_mask, labels=labels)
    memory = model.encode_memory(
        passage_ids.view(-1, passage_ids.shape[-1]), passage_mask.view(-1, passage_mask.shape[-1])
    )
    memory = memory.view(*passage_ids.shape, -1)  # [b, k, lp, d]
    from_memory = model(question_ids, question_mask, passage_memory=memory, passage_mask=passage_mask, labels=labels)
    assert torch.equal(from_ids.logits, from_memory.logits)
    assert torch.equal(from_ids.rerank_scores, from_memory.rerank_scores)
    assert torch.equal(from_ids.selected, from_memory.selected)
    # the pdist target runs under no_grad, where kernels may sum in another order
    assert from_ids.loss.item() == pytest.approx(from_memory.loss.item(), rel=1e-6)


def test_decoder_output_does_not_depend_on_passage_order(tiny_t5_dir):
    model = _glimmer(tiny_t5_dir, live_proportion=0.5)
    question_ids, question_mask, passage_ids, passage_mask, labels = _random_batch()
    encoding = model.encode(question_ids, question_mask, passage_ids, passage_mask)
    batch_size, num_passages = passage_ids.shape[:2]
    hidden = encoding.hidden.view(batch_size, num_passages, -1, model.config.d_model)  # [b, k, l, d]
    mask = encoding.mask.view(batch_size, num_passages, -1)  # [b, k, l]
    permutation = torch.tensor([2, 0, 3, 1])
    decoder_input_ids = model._shift_right(labels)
    original = model.decode(encoding.hidden, encoding.mask, decoder_input_ids)
    permuted = model.decode(
        hidden[:, permutation].reshape(batch_size, -1, model.config.d_model),
        mask[:, permutation].reshape(batch_size, -1),
        decoder_input_ids,
    )
    _assert_float32_close(permuted, original)
    assert not torch.equal(hidden[:, permutation], hidden)  # the permutation did move passages


# ---- reranking ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scoring", ["first_token", "mean_pool"])
def test_selected_is_top_m_of_rerank_scores(tiny_t5_dir, scoring):
    model = _glimmer(tiny_t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=2, scoring=scoring)
    question_ids, question_mask, passage_ids, passage_mask, _ = _random_batch(batch_size=3, num_passages=5)
    encoding = model.encode(question_ids, question_mask, passage_ids, passage_mask)
    assert encoding.rerank_scores.shape == (3, 5)
    assert encoding.selected.shape == (3, 2)
    for example in range(3):
        scores = encoding.rerank_scores[example]
        order = sorted(range(5), key=lambda index: -scores[index].item())
        assert encoding.selected[example].tolist() == order[:2]
    assert encoding.hidden.shape == (3, 2 * (6 + 9), model.config.d_model)


def test_retrieval_prior_starts_as_the_retriever_and_learns_corrections(tiny_t5_dir):
    model = _glimmer(tiny_t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=2, retrieval_prior=True)
    question_ids, question_mask, passage_ids, passage_mask, labels = _random_batch(batch_size=3, num_passages=5)
    retrieval = torch.tensor([[0.1, 0.9, 0.3, 0.5, 0.2], [0.7, 0.1, 0.2, 0.3, 0.8], [0.3, 0.2, 0.1, 0.6, 0.4]])
    encoding = model.encode(question_ids, question_mask, passage_ids, passage_mask, retrieval_scores=retrieval)
    # the untrained scorer ranks exactly as the retriever, whatever the passages say
    assert encoding.selected.tolist() == [[1, 3], [4, 0], [3, 4]]
    torch.testing.assert_close(encoding.rerank_scores, 10.0 * retrieval)
    with pytest.raises(ValueError, match="retrieval_scores"):
        model.encode(question_ids, question_mask, passage_ids, passage_mask)
    # distillation moves the learned part and the prior's weight
    output = model.train()(
        question_ids, question_mask, passage_ids, passage_mask, labels=labels, retrieval_scores=retrieval
    )
    output.pdist_loss.backward()
    assert model.rerank_head.proj.weight.grad.abs().sum() > 0 and model.rerank_head.prior_weight.grad != 0
    with torch.no_grad():
        model.rerank_head.proj.weight.normal_()
    moved = model.eval().encode(question_ids, question_mask, passage_ids, passage_mask, retrieval_scores=retrieval)
    assert not torch.allclose(moved.rerank_scores, 10.0 * retrieval)


def test_scores_read_stage_a_at_first_token_or_mean(tiny_t5_dir):
    first = _glimmer(tiny_t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=2)
    mean = _glimmer(tiny_t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=2, scoring="mean_pool")
    mean.rerank_head.load_state_dict(first.rerank_head.state_dict())
    question_ids, question_mask, passage_ids, passage_mask, _ = _random_batch(batch_size=1, num_passages=3)
    passage_mask[0, 1, 5:] = 0
    memory = first._passage_memory(question_ids, question_mask, passage_ids, passage_mask, None)
    from glimmer_ray.model.modeling import pack_pairs, run_encoder_blocks

    pairs, pair_mask = pack_pairs(
        first.encode_question(question_ids, question_mask), question_mask, memory, passage_mask
    )
    stage_a = run_encoder_blocks(first.live_a_blocks, first._position_bias_source, pairs[0], pair_mask[0], first.config)
    projection = first.rerank_head.proj
    expected_first = projection(stage_a[:, 0]).squeeze(-1)
    valid = pair_mask[0].float()[..., None]
    expected_mean = projection((stage_a * valid).sum(1) / valid.sum(1)).squeeze(-1)
    torch.testing.assert_close(
        first.encode(question_ids, question_mask, passage_ids, passage_mask).rerank_scores[0], expected_first
    )
    torch.testing.assert_close(
        mean.encode(question_ids, question_mask, passage_ids, passage_mask).rerank_scores[0], expected_mean
    )


def test_glimmer_with_m_equal_k_is_lumen(tiny_t5_dir):
    lumen = _glimmer(tiny_t5_dir, live_proportion=0.5)
    glimmer = _glimmer(tiny_t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=4)
    question_ids, question_mask, passage_ids, passage_mask, labels = _random_batch()
    lumen_output = lumen(question_ids, question_mask, passage_ids, passage_mask, labels=labels)
    glimmer_output = glimmer(question_ids, question_mask, passage_ids, passage_mask, labels=labels)
    assert sorted(glimmer_output.selected[0].tolist()) == [0, 1, 2, 3]
    _assert_float32_close(glimmer_output.logits, lumen_output.logits)
    assert glimmer_output.lm_loss.item() == pytest.approx(lumen_output.lm_loss.item(), rel=1e-5)
    assert lumen_output.rerank_scores is None and lumen_output.pdist_loss is None


def test_num_selected_can_be_set_per_call(tiny_t5_dir):
    model = _glimmer(tiny_t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=3)
    question_ids, question_mask, passage_ids, passage_mask, _ = _random_batch()
    assert model.encode(question_ids, question_mask, passage_ids, passage_mask).selected.shape == (2, 3)
    assert model.encode(question_ids, question_mask, passage_ids, passage_mask, num_selected=1).selected.shape == (2, 1)


def test_retriever_selection_reads_the_first_m_and_still_distils(tiny_t5_dir):
    """The training warm-up: the decoder reads the retriever's first m passages (as LUMEN given only those),
    the rerank scores are the model's own and the perplexity-distillation loss is still computed."""
    glimmer = _glimmer(tiny_t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=2)
    lumen = _glimmer(tiny_t5_dir, live_proportion=0.5)
    question_ids, question_mask, passage_ids, passage_mask, labels = _random_batch()
    warm = glimmer(question_ids, question_mask, passage_ids, passage_mask, labels=labels, select_by="retriever")
    reranked = glimmer(question_ids, question_mask, passage_ids, passage_mask, labels=labels)
    first_two = lumen(question_ids, question_mask, passage_ids[:, :2], passage_mask[:, :2], labels=labels)
    assert warm.selected.tolist() == [[0, 1], [0, 1]]
    _assert_float32_close(warm.logits, first_two.logits)
    torch.testing.assert_close(warm.rerank_scores, reranked.rerank_scores)
    assert warm.pdist_loss.item() == pytest.approx(reranked.pdist_loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="select_by"):
        glimmer(question_ids, question_mask, passage_ids, passage_mask, labels=labels, select_by="random")


# ---- perplexity distillation --------------------------------------------------------------------


def test_pdist_target_reads_each_passage_alone_without_dropout(tiny_t5_dropout_dir, tiny_t5_dir):
    """Target for passage i equals the FiD (k = 1) reader's mean answer log-likelihood on pair i."""
    model = GlimmerForConditionalGeneration.from_t5(
        tiny_t5_dropout_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=2
    )
    model.train()
    question_ids, question_mask, passage_ids, passage_mask, labels = _random_batch(num_passages=3)
    labels[0, 3:] = -100
    target = model.passage_log_likelihood(question_ids, question_mask, passage_ids, passage_mask, None, labels)
    assert model.training  # the train/eval mode is restored
    model.eval()
    for passage in range(3):
        single = model(
            question_ids,
            question_mask,
            passage_ids[:, passage : passage + 1],
            passage_mask[:, passage : passage + 1],
            labels=labels,
            num_selected=1,
            pdist_weight=0.0,
        )
        log_probs = torch.log_softmax(single.logits, dim=-1)
        for example in range(2):
            valid = labels[example] != -100
            expected = log_probs[example, valid].gather(1, labels[example, valid][:, None]).mean()
            assert target[example, passage].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)


def test_teacher_reading_on_from_the_students_live_a_gives_the_recomputed_target(tiny_t5_dir, tiny_t5_dropout_dir):
    """The teacher reuses live stage A's states of the student's pass (no second memory / stage A run) and
    gives ATLAS's target within 1e-5; with dropout active the states differ, so it recomputes them."""
    question_ids, question_mask, passage_ids, passage_mask, labels = _random_batch(num_passages=5)
    labels[1, 2:] = -100
    model = _glimmer(tiny_t5_dir, live_proportion=0.75, rerank_proportion=0.5, num_selected=2).train()
    reused = model(question_ids, question_mask, passage_ids, passage_mask, labels=labels)
    recomputed = model(question_ids, question_mask, passage_ids, passage_mask, labels=labels, teacher_reuse=False)
    torch.testing.assert_close(reused.pdist_target, recomputed.pdist_target, rtol=0, atol=1e-5)
    assert reused.pdist_loss.item() == pytest.approx(recomputed.pdist_loss.item(), rel=1e-5, abs=1e-6)

    calls = []
    hook = model.encoder.block[0].register_forward_hook(lambda *_: calls.append(1))  # the first memory layer
    model(question_ids, question_mask, passage_ids, passage_mask, labels=labels)
    hook.remove()
    assert len(calls) == 2  # question + passages once each: the teacher did not run the memory encoder again

    dropout = GlimmerForConditionalGeneration.from_t5(
        tiny_t5_dropout_dir, live_proportion=0.75, rerank_proportion=0.5, num_selected=2
    ).train()
    output = dropout(question_ids, question_mask, passage_ids, passage_mask, labels=labels)
    expected = dropout.passage_log_likelihood(question_ids, question_mask, passage_ids, passage_mask, None, labels)
    torch.testing.assert_close(output.pdist_target, expected, rtol=0, atol=1e-5)  # eval-mode states, recomputed
    with pytest.raises(ValueError, match="one row per pair"):
        model.passage_log_likelihood(
            question_ids, question_mask, passage_ids, passage_mask, None, labels, live_a=torch.zeros(3, 4, 48)
        )


def test_pdist_loss_is_kl_of_target_to_scores():
    scores = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[-3.0, -1.0, -2.0], [-1.0, -4.0, -0.5]])
    for tau in (1.0, 0.1):
        p = torch.softmax(target / tau, -1)
        q = torch.softmax(scores / tau, -1)
        expected = (p * (p.log() - q.log())).sum(-1).mean()
        assert perplexity_distillation_loss(scores, target, tau).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        perplexity_distillation_loss(scores, target, 0.0)


def test_scorer_learns_only_from_pdist(tiny_t5_dir):
    model = _glimmer(tiny_t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=2).train()
    question_ids, question_mask, passage_ids, passage_mask, labels = _random_batch()
    output = model(question_ids, question_mask, passage_ids, passage_mask, labels=labels)
    assert output.loss.item() == pytest.approx(output.lm_loss.item() + output.pdist_loss.item(), rel=1e-6)
    target = model.passage_log_likelihood(question_ids, question_mask, passage_ids, passage_mask, None, labels)
    torch.testing.assert_close(
        output.pdist_target, target
    )  # the target distilled is the one returned (training logs it)
    assert perplexity_distillation_loss(output.rerank_scores, output.pdist_target).item() == pytest.approx(
        output.pdist_loss.item(), rel=1e-5
    )
    assert (
        model(question_ids, question_mask, passage_ids, passage_mask, labels=labels, pdist_weight=0.0).pdist_target
        is None
    )
    output.lm_loss.backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in model.rerank_head.parameters())
    assert model.encoder.block[0].layer[0].SelfAttention.q.weight.grad.abs().sum() > 0  # memory layers do learn
    model.zero_grad()
    output.pdist_loss.backward()
    assert model.rerank_head.proj.weight.grad.abs().sum() > 0


def _copy_task_batch(generator, batch_size, num_passages, passage_length=6):
    """A toy task where one passage per example holds the answer: the answer is one of ten tokens that
    never occur elsewhere, written into the gold passage. Returns inputs, labels and the gold index."""
    question_ids = torch.randint(20, VOCAB, (batch_size, 2), generator=generator)
    passage_ids = torch.randint(20, VOCAB, (batch_size, num_passages, passage_length), generator=generator)
    gold = torch.randint(0, num_passages, (batch_size,), generator=generator)
    answers = torch.randint(10, 20, (batch_size,), generator=generator)
    passage_ids[torch.arange(batch_size), gold, 1:4] = answers[:, None]
    labels = torch.stack([answers, torch.ones_like(answers)], dim=1)  # answer + EOS
    return question_ids, torch.ones_like(question_ids), passage_ids, torch.ones_like(passage_ids), labels, gold


def _gold_top1(model, generator, batches=4):
    hits = total = 0
    with torch.no_grad():
        for _ in range(batches):
            *inputs, labels, gold = _copy_task_batch(generator, 32, 4)
            encoding = model.encode(*inputs)
            hits += (encoding.selected[:, 0] == gold).sum().item()
            total += len(gold)
    return hits / total


def test_training_raises_the_rank_of_the_answer_passage(tiny_t5_dir):
    torch.manual_seed(0)
    model = GlimmerForConditionalGeneration.from_t5(
        tiny_t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=1
    )
    before = _gold_top1(model.eval(), torch.Generator().manual_seed(123))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(7)
    model.train()
    for _ in range(100):
        *inputs, labels, _ = _copy_task_batch(generator, 16, 4)
        loss = model(*inputs, labels=labels, pdist_temperature=0.1).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _gold_top1(model.eval(), torch.Generator().manual_seed(123))
    # chance is 0.25; on this seed the gold passage goes from about 0.3 to about 0.87 of examples
    assert after >= 0.7 and after >= before + 0.3, (before, after)


# ---- generation ---------------------------------------------------------------------------------


def test_greedy_generation_matches_hf_generate_in_fid_setting(tiny_t5_dir, hf_t5):
    model = _glimmer(tiny_t5_dir)
    question_ids, question_mask, passage_ids, passage_mask, _ = _random_batch(num_passages=1)
    tokens, _ = model.generate(question_ids, question_mask, passage_ids, passage_mask, max_new_tokens=8)
    reference = hf_t5.generate(
        input_ids=torch.cat([question_ids, passage_ids[:, 0]], 1), max_new_tokens=8, do_sample=False, num_beams=1
    )
    assert torch.equal(tokens, reference)


def test_greedy_generation_with_cache_equals_argmax_of_full_forward(tiny_t5_dir):
    model = _glimmer(tiny_t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=2)
    question_ids, question_mask, passage_ids, passage_mask, _ = _random_batch()
    tokens, encoding = model.generate(
        question_ids, question_mask, passage_ids, passage_mask, max_new_tokens=6, min_new_tokens=6
    )
    assert tokens.shape == (2, 7)
    logits = model.decode(encoding.hidden, encoding.mask, tokens[:, :-1])
    assert torch.equal(logits.argmax(-1), tokens[:, 1:])


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(live_proportion=1.5), "live_proportion"),
        (dict(live_proportion=-0.1), "live_proportion"),
        (dict(rerank_proportion=2.0), "rerank_proportion"),
        (dict(num_selected=0), "num_selected"),
        (dict(scoring="max"), "scoring"),
    ],
)
def test_bad_config_raises(options, message):
    with pytest.raises(ValueError, match=message):
        GlimmerConfig(**options)


def test_bad_inputs_raise_clear_errors(tiny_t5_dir):
    model = _glimmer(tiny_t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=2)
    question_ids, question_mask, passage_ids, passage_mask, labels = _random_batch()
    with pytest.raises(ValueError, match=r"num_selected \(m = 5\) exceeds .* \(k = 4\)"):
        model.encode(question_ids, question_mask, passage_ids, passage_mask, num_selected=5)
    with pytest.raises(ValueError, match="batch size"):
        model.encode(question_ids[:1], question_mask[:1], passage_ids, passage_mask)
    with pytest.raises(ValueError, match="passage_mask has shape"):
        model.encode(question_ids, question_mask, passage_ids, passage_mask[:, :3])
    with pytest.raises(ValueError, match="no passages"):
        model.encode(question_ids, question_mask, passage_ids[:, :0], passage_mask[:, :0])
    empty = passage_mask.clone()
    empty[1, 2] = 0
    with pytest.raises(ValueError, match="passage 2 of example 1 is empty"):
        model.encode(question_ids, question_mask, passage_ids, empty)
    with pytest.raises(ValueError, match="exactly one of passage_ids"):
        model.encode(question_ids, question_mask, passage_ids, passage_mask, passage_memory=torch.zeros(2, 4, 9, 48))
    with pytest.raises(ValueError, match="width 32"):
        model.encode(question_ids, question_mask, passage_mask=passage_mask, passage_memory=torch.zeros(2, 4, 9, 32))
    with pytest.raises(ValueError, match="empty sequence"):
        model.encode(question_ids, torch.zeros_like(question_mask), passage_ids, passage_mask)
    with pytest.raises(ValueError, match="labels or decoder_input_ids"):
        model(question_ids, question_mask, passage_ids, passage_mask)


def test_non_t5_checkpoint_is_refused(tmp_path):
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'gpt2' checkpoint.*T5"):
        GlimmerForConditionalGeneration.from_t5(tmp_path)
    with pytest.raises(FileNotFoundError):
        GlimmerForConditionalGeneration.from_t5(tmp_path / "missing")


# ---- checkpoints --------------------------------------------------------------------------------


def test_from_t5_copies_every_weight(tiny_t5_dir, hf_t5):
    model = _glimmer(tiny_t5_dir, live_proportion=0.5, separate_question_encoder=True)
    state = model.state_dict()
    for name, tensor in hf_t5.state_dict().items():
        assert torch.equal(state[name], tensor), name
    assert not torch.equal(state["lm_head.weight"], state["shared.weight"])  # T5.1.1: untied
    for name, tensor in state.items():
        if name.startswith("question_encoder."):
            assert torch.equal(tensor, state["encoder.block." + name[len("question_encoder.") :]])


def test_from_t5_reads_a_sharded_checkpoint_as_the_loaded_model(hf_t5, tmp_path):
    # a large T5 comes in safetensors shards: read shard by shard into GLIMMER, the same weights as from the model
    hf_t5.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 2
    options = dict(live_proportion=0.5, separate_question_encoder=True, retrieval_prior=True)
    from_dir = GlimmerForConditionalGeneration.from_t5(tmp_path, **options).state_dict()
    from_model = GlimmerForConditionalGeneration.from_t5(hf_t5, **options).state_dict()
    assert set(from_dir) == set(from_model)
    for name, tensor in from_model.items():
        assert torch.equal(from_dir[name], tensor), name
    # a checkpoint of another shape is refused, naming the tensors that do not fit
    config = hf_t5.config.to_dict()
    config["d_ff"] = 2 * config["d_ff"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit the GLIMMER layout.*DenseReluDense"):
        GlimmerForConditionalGeneration.from_t5(tmp_path, **options)


@pytest.mark.parametrize(
    "options",
    [
        dict(live_proportion=0.5, rerank_proportion=0.5, num_selected=2),
        dict(live_proportion=0.5, separate_question_encoder=True, scoring="mean_pool", num_selected=1),
        dict(live_proportion=0.5, rerank_proportion=0.5, num_selected=2, retrieval_prior=True),
    ],
)
def test_save_pretrained_round_trips_bit_exactly(tiny_t5_dir, tmp_path, options):
    model = _glimmer(tiny_t5_dir, **options)
    with torch.no_grad():
        model.rerank_head.proj.weight.normal_()  # a trained-looking head, not the init
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "glimmer"
    loaded = GlimmerForConditionalGeneration.from_pretrained(tmp_path).eval()
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    for key in (
        "live_proportion",
        "rerank_proportion",
        "num_selected",
        "scoring",
        "separate_question_encoder",
        "retrieval_prior",
    ):
        assert getattr(loaded.config, key) == getattr(model.config, key)
    assert loaded.lm_head.weight is not loaded.shared.weight
    stored = load_file(tmp_path / "model.safetensors")
    assert torch.equal(stored["rerank_head.proj.weight"], model.rerank_head.proj.weight)
    question_ids, question_mask, passage_ids, passage_mask, labels = _random_batch()
    retrieval = torch.rand(passage_ids.shape[:2], generator=torch.Generator().manual_seed(0))  # [b, k]
    assert torch.equal(
        model(question_ids, question_mask, passage_ids, passage_mask, labels=labels, retrieval_scores=retrieval).logits,
        loaded(
            question_ids, question_mask, passage_ids, passage_mask, labels=labels, retrieval_scores=retrieval
        ).logits,
    )


def test_chunked_live_stages_equal_one_pass(tiny_t5_dir):
    model = _glimmer(tiny_t5_dir, live_proportion=0.5, rerank_proportion=0.5, num_selected=3)
    question_ids, question_mask, passage_ids, passage_mask, _ = _random_batch(num_passages=5)
    question_memory = model.encode_question(question_ids, question_mask)
    memory = model._passage_memory(question_ids, question_mask, passage_ids, passage_mask, None)
    whole = model.live_encode(question_memory, question_mask, memory, passage_mask, chunk_tokens=10**6)
    chunked = model.live_encode(
        question_memory, question_mask, memory, passage_mask, chunk_tokens=20
    )  # one pair per chunk
    assert torch.equal(whole.selected, chunked.selected)
    _assert_float32_close(chunked.rerank_scores, whole.rerank_scores)
    _assert_float32_close(chunked.hidden, whole.hidden)


def test_chunking_is_per_call_and_per_device(tiny_t5_dir):
    """`chunk_tokens`: None reads every pair in one call, "auto" chunks on a CPU only; all give the same output."""
    assert resolve_chunk_tokens("auto", torch.device("cpu")) == CPU_LIVE_CHUNK_TOKENS
    assert resolve_chunk_tokens("auto", torch.device("cuda")) is None
    assert resolve_chunk_tokens(None, torch.device("cpu")) is None and resolve_chunk_tokens(64, "cpu") == 64
    for bad in (0, -5, "big", True, 1.5):
        with pytest.raises(ValueError, match="chunk_tokens"):
            resolve_chunk_tokens(bad, torch.device("cpu"))
    model = _glimmer(tiny_t5_dir, live_proportion=0.75, rerank_proportion=0.5, num_selected=2)
    question_ids, question_mask, passage_ids, passage_mask, labels = _random_batch(num_passages=5)
    outputs = [
        model(question_ids, question_mask, passage_ids, passage_mask, labels=labels, chunk_tokens=chunk)
        for chunk in (None, "auto", 20)
    ]
    for output in outputs[1:]:
        _assert_float32_close(output.logits, outputs[0].logits)
        torch.testing.assert_close(output.pdist_target, outputs[0].pdist_target, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        dict(live_proportion=1.0, num_selected=None),  # FiD
        dict(live_proportion=0.5, num_selected=None),  # LUMEN
        dict(live_proportion=0.75, rerank_proportion=0.5, num_selected=2),  # GLIMMER
    ],
    ids=["fid", "lumen", "glimmer"],
)
def test_sdpa_attention_matches_eager(tiny_t5_dir, options):
    """The reader runs PyTorch's scaled_dot_product_attention (the relative position bias as its additive mask)
    by default; it matches eager attention within 1e-5 in float32, training loss and distillation target included."""
    model = _glimmer(tiny_t5_dir, **options)
    assert model.config._attn_implementation == "sdpa"
    question_ids, question_mask, passage_ids, passage_mask, labels = _random_batch(num_passages=4)
    question_mask[0, -2:] = 0
    passage_mask[1, 2, -3:] = 0
    sdpa = model(question_ids, question_mask, passage_ids, passage_mask, labels=labels)
    sdpa_tokens, _ = model.generate(question_ids, question_mask, passage_ids, passage_mask, max_new_tokens=4)
    model.set_attn_implementation("eager")
    eager = model(question_ids, question_mask, passage_ids, passage_mask, labels=labels)
    eager_tokens, _ = model.generate(question_ids, question_mask, passage_ids, passage_mask, max_new_tokens=4)
    scale = eager.logits.abs().max().item()
    assert (sdpa.logits - eager.logits).abs().max().item() <= 1e-5 * max(1.0, scale)
    assert sdpa.loss.item() == pytest.approx(eager.loss.item(), rel=1e-5)
    assert torch.equal(sdpa_tokens, eager_tokens)
    if eager.pdist_target is not None:
        torch.testing.assert_close(sdpa.pdist_target, eager.pdist_target, rtol=0, atol=1e-5)


def test_reranking_without_a_live_layer_before_it_is_refused():
    # 4 layers, alpha 1/3, beta 1/4: 3 memory layers, 0 before reranking: first-token scores would all be equal
    with pytest.raises(ValueError, match="score every passage alike"):
        GlimmerConfig(num_layers=4, live_proportion=1 / 3, rerank_proportion=0.25, num_selected=2)
    GlimmerConfig(num_layers=4, live_proportion=1 / 3, rerank_proportion=0.25, num_selected=2, scoring="mean_pool")
    GlimmerConfig(num_layers=12, live_proportion=1 / 3, rerank_proportion=0.25, num_selected=2)
