"""Pre-training: the corruption and the find-and-copy examples are what they claim, and the pre-training job learns
and writes a checkpoint GLIMMER loads (`from_t5`) and reuses."""

import json
import os
import random

import numpy as np
import pytest
import torch
from transformers import T5ForConditionalGeneration

from glimmer_ray.train.pretrain import (
    CopyBatches,
    DenoisingBatches,
    PretrainConfig,
    corrupt,
    find_and_copy,
    pretrain_t5,
    teacher_forced_hits,
)

SENTINEL = 999  # <extra_id_0> in a 1000-token vocabulary


def _spans_filled(corrupted: list[int], original: list[int]) -> bool:
    """True when putting some non-empty run of the original back for every sentinel gives the original."""

    def match(i: int, j: int) -> bool:
        if i == len(corrupted):
            return j == len(original)
        if corrupted[i] >= SENTINEL - 100:
            return any(match(i + 1, end) for end in range(j + 1, len(original) + 1))
        return j < len(original) and corrupted[i] == original[j] and match(i + 1, j + 1)

    return match(0, 0)


def test_corruption_replaces_spans_by_descending_sentinels_and_targets_the_whole_passage():
    rng = np.random.default_rng(0)
    noise = []
    for length in (2, 7, 40, 90):
        original = list(range(10, 10 + length))
        source, target = corrupt(original, rng, SENTINEL, noise_density=0.15, mean_span_length=3.0)
        assert target == original + [1]  # the whole passage, then </s>
        assert source[-1] == 1
        sentinels = [t for t in source[:-1] if t >= SENTINEL - 100]
        assert sentinels == list(range(SENTINEL, SENTINEL - len(sentinels), -1)) and sentinels
        assert _spans_filled(source[:-1], original)
        noise.append(1 - (len(source) - 1 - len(sentinels)) / length)
    assert 0.05 < np.mean(noise[2:]) < 0.4
    with pytest.raises(ValueError, match="noise_density"):
        corrupt([1, 2, 3], rng, SENTINEL, noise_density=1.5)
    with pytest.raises(ValueError, match="mean_span_length"):
        corrupt([1, 2, 3], rng, SENTINEL, mean_span_length=0.5)


def test_batches_are_padded_and_seeded():
    passages = [list(range(5, 5 + n)) for n in (12, 30, 7)]
    first = DenoisingBatches(passages, batch_size=4, first_sentinel=SENTINEL, seed=3).next()
    again = DenoisingBatches(passages, batch_size=4, first_sentinel=SENTINEL, seed=3).next()
    assert all(np.array_equal(first[key], again[key]) for key in first)
    assert first["input_ids"].shape == first["attention_mask"].shape and first["labels"].shape[0] == 4
    assert ((first["input_ids"] == 0) == (first["attention_mask"] == 0)).all()
    for row in range(4):
        target = first["labels"][row][first["labels"][row] != -100].tolist()
        assert target[:-1] in passages and target[-1] == 1
    with pytest.raises(ValueError, match="no passages"):
        DenoisingBatches([], batch_size=2, first_sentinel=SENTINEL)


def test_copy_examples_ask_for_the_tokens_after_the_query():
    rng = random.Random(0)
    sequence = list(range(100, 140))  # distinct tokens: the query occurs once
    starts = set()
    for _ in range(200):
        query, target = find_and_copy(sequence, rng, query_tokens=3, copy_tokens=5)
        start = sequence.index(query[0])
        assert sequence[start : start + 3] == query and sequence[start + 3 : start + 8] == target
        starts.add(start)
    assert min(starts) == 0 and max(starts) == len(sequence) - 8  # every position can be asked
    with pytest.raises(ValueError, match="holds no query"):
        find_and_copy([5, 6, 7], rng, query_tokens=2, copy_tokens=2)
    with pytest.raises(ValueError, match="at least 1"):
        find_and_copy(sequence, rng, query_tokens=0, copy_tokens=2)

    tokens = [7, 7, 7, 9, 11, 13] * 50  # frequent and rare tokens: each distinct token is drawn alike
    batch = CopyBatches(tokens, batch_size=64, sequence_tokens=20, query_tokens=4, copy_tokens=6, seed=1).next()
    assert batch["input_ids"].shape == (64, 4 + 1 + 20 + 1) and batch["labels"].shape == (64, 6 + 1)
    assert bool(batch["attention_mask"].all())
    assert (batch["input_ids"][:, 4] == 1).all() and (batch["input_ids"][:, -1] == 1).all()
    assert (batch["labels"][:, -1] == 1).all()
    drawn = batch["input_ids"][:, 5:-1]
    assert set(drawn.unique().tolist()) == {7, 9, 11, 13} and 0.15 < float((drawn == 7).float().mean()) < 0.35
    for row in range(64):
        query, sequence = batch["input_ids"][row, :4].tolist(), batch["input_ids"][row, 5:-1].tolist()
        target = batch["labels"][row, :-1].tolist()
        assert any(sequence[s : s + 4] == query and sequence[s + 4 : s + 10] == target for s in range(15))
    again = CopyBatches(tokens, batch_size=64, sequence_tokens=20, query_tokens=4, copy_tokens=6, seed=1).next()
    assert all(bool((batch[key] == again[key]).all()) for key in batch)
    with pytest.raises(ValueError, match="must hold"):
        CopyBatches(tokens, batch_size=2, sequence_tokens=8, query_tokens=4, copy_tokens=6)


def test_copy_among_near_misses_has_one_exact_match():
    """k passages in FiD form: exactly one holds the query followed by the target; every other holds the query
    with one token changed (a near miss, as a same-family name), so only the exact match answers."""
    tokens = list(range(10, 60))
    batches = CopyBatches(tokens, batch_size=32, sequence_tokens=20, query_tokens=4, copy_tokens=6, seed=2, passages=5)
    batch = batches.next()
    assert batch["question_ids"].shape == (32, 5) and batch["passage_ids"].shape == (32, 5, 21)
    assert bool(batch["passage_mask"].all()) and (batch["passage_ids"][:, :, -1] == 1).all()
    gold_places = set()
    for row in range(32):
        query, target = batch["question_ids"][row, :4].tolist(), batch["labels"][row, :-1].tolist()
        exact, near = [], 0
        for place, passage in enumerate(batch["passage_ids"][row, :, :-1].tolist()):
            windows = [passage[s : s + 4] for s in range(17)]
            if any(w == query and passage[s + 4 : s + 10] == target for s, w in enumerate(windows)):
                exact.append(place)
            elif any(sum(a != b for a, b in zip(w, query)) == 1 for w in windows):
                near += 1
        assert len(exact) == 1 and near == 4
        gold_places.add(exact[0])
    assert len(gold_places) > 2  # the answering passage is not always in one place
    with pytest.raises(ValueError, match="near_miss_tokens"):
        CopyBatches(tokens, batch_size=2, sequence_tokens=20, query_tokens=4, copy_tokens=6, near_miss_tokens=5)


def test_near_misses_at_the_start_differ_only_in_the_querys_first_tokens():
    """near_miss_at "start": each distractor holds the query with exactly its first near_miss_tokens tokens changed
    and the rest intact (a same-family name: what tells the passages apart lies far from the copied span)."""
    tokens = list(range(10, 60))
    batches = CopyBatches(
        tokens,
        16,
        sequence_tokens=24,
        query_tokens=6,
        copy_tokens=4,
        seed=3,
        passages=4,
        near_miss_tokens=2,
        near_miss_at="start",
    )
    batch = batches.next()
    for row in range(16):
        query = batch["question_ids"][row, :6].tolist()
        kinds = []
        for passage in batch["passage_ids"][row, :, :-1].tolist():
            windows = [passage[s : s + 6] for s in range(19)]
            if query in windows:
                kinds.append("exact")
            elif any(w[2:] == query[2:] and w[0] != query[0] and w[1] != query[1] for w in windows):
                kinds.append("start")
        assert sorted(kinds) == ["exact", "start", "start", "start"]
    with pytest.raises(ValueError, match="near_miss_at"):
        CopyBatches(tokens, 2, sequence_tokens=20, query_tokens=4, copy_tokens=6, near_miss_at="end")


def test_first_token_accuracy_counts_only_the_first_written_token_of_each_row():
    """The matching figure of copy among near misses: row 0 writes its first token right and the next wrong, row 1
    the first wrong and the next right, row 2 has no target at all (-100); padding never counts."""
    labels = torch.tensor([[5, 6, -100], [7, 8, 9], [-100, -100, -100]])
    guesses = torch.tensor([[5, 0, 3], [0, 8, 9], [1, 1, 1]])
    logits = torch.nn.functional.one_hot(guesses, 10).float()  # [b, t, V]: argmax = guesses
    assert teacher_forced_hits(logits, labels) == (3, 5, 1, 2)


def test_pretraining_lowers_the_loss_and_writes_a_checkpoint_glimmer_loads(tmp_path):
    from transformers import AutoTokenizer

    from glimmer_ray.data import synthkilt
    from glimmer_ray.data.tokenizer import save_tokenizer, train_t5_tokenizer
    from glimmer_ray.model import GlimmerForConditionalGeneration
    from glimmer_ray.retrieval.passages import write_passages

    directory = tmp_path / "benchmark"
    synthkilt.generate(directory, "tiny", seed=3)
    data = tmp_path / "data"
    write_passages(str(directory / "knowledge.jsonl"), str(data / "passages.parquet"), 64)
    pages = [json.loads(line) for line in open(directory / "knowledge.jsonl")]
    save_tokenizer(train_t5_tokenizer((" ".join(page["text"]) for page in pages), vocab_size=600), data / "tokenizer")
    config = PretrainConfig(
        data_dir=str(data),
        output_dir=str(tmp_path / "t5"),
        d_model=32,
        num_layers=2,
        num_heads=2,
        steps=60,
        batch_size=8,
        warmup_steps=10,
        num_cpus=1,
        log_every_steps=20,
    )
    summary = pretrain_t5(
        **{k: v for k, v in vars(config).items() if k not in ("overwrite", "ray_address")}
    )  # the Ray task's body, here
    assert summary["final_loss"] < 0.6 * summary["first_loss"]
    assert 0.3 < summary["final_token_accuracy"] <= 1.0  # 0.56 here: sentinels, </s> and frequent tokens are written
    assert not os.path.exists(str(tmp_path / "t5") + ".tmp")
    files = os.listdir(tmp_path / "t5")
    assert "model.safetensors" in files and "pretrain.json" in files
    glimmer = GlimmerForConditionalGeneration.from_t5(
        str(tmp_path / "t5"), live_proportion=0.5, rerank_proportion=0.5, num_selected=2
    )
    assert glimmer.config.d_model == 32 and glimmer.config.vocab_size == len(
        AutoTokenizer.from_pretrained(tmp_path / "t5")
    )
    # another corpus, tokenised by the fine-tuning data's tokenizer (tokenizer_dir), which the checkpoint carries
    other = tmp_path / "other"
    save_tokenizer(train_t5_tokenizer([p["wikipedia_title"] for p in pages], vocab_size=200), other / "tokenizer")
    pretrain_t5(
        **{
            **{k: v for k, v in vars(config).items() if k not in ("overwrite", "ray_address")},
            "output_dir": str(tmp_path / "t5-other"),
            "tokenizer_dir": str(other / "tokenizer"),
            "steps": 2,
        }
    )
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "t5-other").get_vocab()
        == AutoTokenizer.from_pretrained(other / "tokenizer").get_vocab()
        != AutoTokenizer.from_pretrained(data / "tokenizer").get_vocab()
    )
    # the copy objective, with the original T5's tied output embedding: the checkpoint keeps the tie
    copied = pretrain_t5(
        **{
            **{k: v for k, v in vars(config).items() if k not in ("overwrite", "ray_address")},
            "output_dir": str(tmp_path / "t5-copy"),
            "objective": "copy",
            "tie_embeddings": True,
            "steps": 40,
        }
    )
    assert copied["objective"] == "copy" and copied["final_loss"] < copied["first_loss"]
    reader = GlimmerForConditionalGeneration.from_t5(str(tmp_path / "t5-copy"), live_proportion=1.0)
    assert reader.config.lm_head_tied and reader.lm_head.weight.data_ptr() == reader.shared.weight.data_ptr()
    # continued among near misses, read in FiD form (k 3): learned, and saved as the T5 whose weights it trained
    among = pretrain_t5(
        **{
            **{k: v for k, v in vars(config).items() if k not in ("overwrite", "ray_address")},
            "output_dir": str(tmp_path / "t5-among"),
            "objective": "copy",
            "copy_passages": 3,
            "init_checkpoint": str(tmp_path / "t5-copy"),
            "steps": 40,
        }
    )
    assert among["copy_passages"] == 3 and among["final_loss"] < among["first_loss"]
    assert 0.0 <= among["final_first_token_accuracy"] <= 1.0
    continued = T5ForConditionalGeneration.from_pretrained(tmp_path / "t5-among")
    started = T5ForConditionalGeneration.from_pretrained(tmp_path / "t5-copy")
    assert continued.config.tie_word_embeddings  # the shape and the tie come from init_checkpoint
    weight = "encoder.block.1.layer.0.SelfAttention.q.weight"
    assert not torch.equal(continued.state_dict()[weight], started.state_dict()[weight])
    with pytest.raises(ValueError, match="needs objective 'copy'"):
        pretrain_t5(data_dir=str(data), output_dir=str(tmp_path / "t5-bad"), copy_passages=3)
    with pytest.raises(ValueError, match="objective must be"):
        pretrain_t5(data_dir=str(data), output_dir=str(tmp_path / "t5-bad"), objective="mlm")
