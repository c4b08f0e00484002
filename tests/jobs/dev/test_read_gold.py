"""jobs/dev/read_gold.py: a from-scratch reader trained on gold evidence alone, its dev EM read off the oracle
predictions (scored by hand here against the answers), and bad settings refused."""

from __future__ import annotations

import json
import random

import pytest

pytestmark = pytest.mark.ray


def test_read_gold_trains_on_the_evidence_and_scores_the_held_out_questions(quickstart_run, tmp_path, load_job):
    _, _, root = quickstart_run
    job = load_job("dev/read_gold")
    config = job.ReadGoldConfig(
        data_dir=str(root), tasks=["nq", "trex"], d_model=32, num_layers=2, num_heads=2, steps=6, batch_size=4,
        eval_every=3, log_every=2, dev_limit_per_task=3, tie_embeddings=True, output=str(tmp_path / "read.json"),
    )  # fmt: skip
    config.copy_source = "random"
    report = job.main(config)
    assert json.loads((tmp_path / "read.json").read_text()) == report
    assert [point["step"] for point in report["curve"]] == [3, 6]
    for point in report["curve"]:
        assert set(point) >= {"nq", "trex", "average", "loss", "minutes"} and point["loss"] > 0
        assert point["average"] == pytest.approx((point["nq"] + point["trex"]) / 2, abs=1e-4)
    with pytest.raises(SystemExit, match="tasks must be"):
        job.main(job.ReadGoldConfig(data_dir=str(root), tasks=["squad"]))
    with pytest.raises(SystemExit, match="is missing"):
        job.main(job.ReadGoldConfig(data_dir=str(tmp_path / "nowhere")))


def test_copy_batches_ask_for_the_tokens_after_the_query_and_copy_pretraining_runs(quickstart_run, tmp_path, load_job):
    _, _, root = quickstart_run
    job = load_job("dev/read_gold")
    config = job.ReadGoldConfig(
        data_dir=str(root), tasks=["nq"], d_model=32, num_layers=2, num_heads=2, steps=2, batch_size=4, eval_every=2,
        log_every=2, dev_limit_per_task=2, copy_steps=3, copy_source="random", output=str(tmp_path / "copy.json"),
    )  # fmt: skip
    pool = [list(range(10, 40)), list(range(50, 90))]
    for source, length in (("passages", 0), ("random", 0), ("uniform", 24)):
        config.copy_source, config.copy_passage_tokens = source, length
        usable, tokens = job._copy_pool(pool, config)
        if source == "uniform":
            assert tokens == list(range(10, 40)) + list(range(50, 90))
        batch = job.copy_batch(usable, config, random.Random(0), eos=1, tokens=tokens)
        for row in range(config.batch_size):
            passage = [int(t) for t in batch["passage_ids"][row, 0] if t != 0]
            query = batch["question_ids"][row, : config.copy_query_tokens].tolist()
            target = batch["labels"][row, : config.copy_tokens].tolist()
            assert passage[-1] == 1 and batch["question_ids"][row, -1] == 1 and batch["labels"][row, -1] == 1
            starts = [i for i in range(len(passage)) if passage[i : i + len(query)] == query]
            assert any(passage[s + len(query) : s + len(query) + len(target)] == target for s in starts)
            if source == "passages":
                assert passage[:-1] in pool
            elif length:
                assert len(passage) == length + 1
            else:
                assert set(passage[:-1]) <= set(pool[0]) | set(pool[1])
    config.copy_source = "uniform"
    report = job.main(config)
    assert [point["copy_step"] for point in report["copy_curve"]] == [2, 3]
    for point in report["copy_curve"]:
        assert 0 <= point["held_out_spans_whole"] <= point["held_out_token_accuracy"] <= 1 and point["loss"] > 0
    with pytest.raises(SystemExit, match="copy_source"):
        job.main(job.ReadGoldConfig(data_dir=str(root), copy_source="shuffled"))
    with pytest.raises(SystemExit, match="copy_passage_tokens must be"):
        job.main(job.ReadGoldConfig(data_dir=str(root), copy_source="uniform", copy_passage_tokens=8))
    with pytest.raises(SystemExit, match="no passage holds"):
        job._copy_pool([[5, 6]], config)


def test_distractors_join_the_gold_passage_and_the_run_scores_both_readings(quickstart_run, tmp_path, load_job):
    """Each step reads the gold passage first, then the retriever's first n passages that are not gold; the
    evaluation scores the gold reading and the retriever's first n; near-miss copy batches interleave; a GLIMMER
    export continues as it is; bad curricula are refused."""
    import numpy as np
    import pyarrow.parquet as pq

    from glimmer_ray.data.stream import TokenizeBatch, TokenizeConfig

    _, _, root = quickstart_run
    job = load_job("dev/read_gold")
    tokenize = TokenizeBatch(str(root / "tokenizer"), TokenizeConfig(16, 24, 6, num_passages=4, evidence_passages=1))
    rows = pq.read_table(root / "retrieved" / "nq-train.parquet").to_pylist()[:6]
    batch = tokenize({key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]})
    read = job.with_distractors(batch, 2)
    assert read["passage_ids"].shape == (6, 3, 24) and read["passage_scores"].shape == (6, 3)
    for row in range(6):
        assert np.array_equal(read["passage_ids"][row, 0], batch["evidence_ids"][row, 0])
        others = [i for i, key in enumerate(batch["passage_keys"][row]) if key not in set(batch["evidence_keys"][row])]
        assert np.array_equal(read["passage_ids"][row, 1:], batch["passage_ids"][row][others[:2]])
    assert np.array_equal(job.with_distractors(batch, 0)["passage_ids"], batch["evidence_ids"])
    with pytest.raises(ValueError, match="non-gold retrieved passages"):
        job.with_distractors(batch, 4)

    config = job.ReadGoldConfig(
        data_dir=str(root), tasks=["nq", "trex"], checkpoint=str(root / "model"), steps=4, batch_size=4, eval_every=4,
        log_every=2, dev_limit_per_task=3, distractors_min=1, distractors_max=2, eval_retrieved=3, copy_every=2,
        copy_query_tokens=4, copy_tokens=3, copy_passage_tokens=12, copy_passages=3, copy_near_miss_tokens=1,
        output=str(tmp_path / "mixed.json"),
    )  # fmt: skip
    report = job.main(config)
    point = report["curve"][-1]
    assert {"nq", "trex", "retrieved/nq", "retrieved/trex", "retrieved/average"} <= set(point)
    assert point["near_miss_copy_loss"] > 0 and point["loss"] > 0
    with pytest.raises(SystemExit, match="distractors_min and distractors_max"):
        job.main(job.ReadGoldConfig(data_dir=str(root), distractors_min=2, distractors_max=1))
    with pytest.raises(SystemExit, match="copy_steps and copy_every must be >= 0"):
        job.main(job.ReadGoldConfig(data_dir=str(root), copy_every=-2))


def test_swapped_distractors_are_minimal_pairs_of_the_gold_passage_and_the_reader_is_saved(
    quickstart_run, tmp_path, load_job
):
    """A swapped distractor is the gold passage with the subject's first name and the answer exchanged for another
    question's of the same relation (the family name kept); a row that cannot be swapped keeps the retriever's; the
    run trains on them and saves a reader that loads as it was."""
    import pyarrow.parquet as pq
    import torch

    from glimmer_ray.model import GlimmerForConditionalGeneration

    _, _, root = quickstart_run
    job = load_job("dev/read_gold")
    rows = [
        row
        for task in ("nq", "trex")
        for row in pq.read_table(root / "retrieved" / f"{task}-train.parquet").to_pylist()
    ]
    donors = job.swap_donors(rows)
    swapped_rows = 0
    for row in rows[:80]:
        key = job.relation_key(row)
        swapped = job.swapped_distractors(row, 2, donors, random.Random(1))
        if swapped is row:
            continue
        swapped_rows += 1
        title, text, answer = row["gold_titles"][0], row["gold_texts"][0], row["answers"][0]
        changed = [i for i, (a, b) in enumerate(zip(row["passage_ids"], swapped["passage_ids"])) if a != b]
        non_gold = [i for i, key in enumerate(row["passage_ids"]) if key not in set(row["gold_ids"])]
        assert changed == non_gold[:2] and [swapped["passage_ids"][i] for i in changed] == ["swap-0", "swap-1"]
        names = set()
        for index in changed:
            other = swapped["passage_titles"][index]
            assert other.split(" ")[1:] == title.split(" ")[1:] and other.split(" ")[0] != title.split(" ")[0]
            pairs = [(t.split(" ")[0], a) for t, a in donors[key] if t.split(" ")[0] == other.split(" ")[0]]
            other_answer = next(a for name, a in pairs if text.replace(answer, a).replace(title, other)
                                == swapped["passage_texts"][index])  # fmt: skip
            assert other_answer != answer and title not in swapped["passage_texts"][index].replace(other, "")
            names.add(other)
        assert len(names) == 2
        for column in job.PASSAGE_COLUMNS:  # the other retrieved passages are the retriever's
            assert [v for i, v in enumerate(swapped[column]) if i not in changed] == [
                v for i, v in enumerate(row[column]) if i not in changed
            ]
    assert swapped_rows >= 40
    assert job.swapped_distractors(rows[0], 0, donors, random.Random(1)) is rows[0]
    unnamed = {**rows[0], "input": "a question that names nobody"}
    assert (
        job.relation_key(unnamed) is None and job.swapped_distractors(unnamed, 2, donors, random.Random(1)) is unnamed
    )

    paired = job.minimal_pairs(rows[0], 3, donors, random.Random(1))
    assert paired["passage_ids"][0] == rows[0]["gold_ids"][0] and paired["passage_texts"][0] == rows[0]["gold_texts"][0]
    assert paired["passage_ids"][1:] == ["swap-0", "swap-1", "swap-2"] and len(paired["passage_scores"]) == 4
    assert job.minimal_pairs(unnamed, 3, donors, random.Random(1)) is None

    config = job.ReadGoldConfig(
        data_dir=str(root), tasks=["nq", "trex"], checkpoint=str(root / "model"), steps=2, batch_size=4, eval_every=2,
        log_every=2, dev_limit_per_task=2, distractors_min=2, distractors_max=2, distractor_source="swapped",
        eval_swapped=2, output=str(tmp_path / "swapped.json"), save_dir=str(tmp_path / "reader"),
    )  # fmt: skip
    report = job.main(config)
    point = report["curve"][-1]
    assert point["loss"] > 0 and {"swapped/nq", "swapped/trex", "swapped/average"} <= set(point)
    written = pq.read_table(tmp_path / "swapped-minimal-pairs" / "nq-dev.parquet").to_pylist()
    assert written and all(len(row["passage_ids"]) == 3 and row["passage_ids"][0] in row["gold_ids"] for row in written)
    saved = GlimmerForConditionalGeneration.from_pretrained(str(tmp_path / "reader"))
    trained = GlimmerForConditionalGeneration.from_pretrained(str(root / "model"))
    assert (tmp_path / "reader" / "tokenizer_config.json").exists() and not (tmp_path / "reader.tmp").exists()
    weights = dict(saved.named_parameters())
    assert any(not torch.equal(weights[name], p) for name, p in trained.named_parameters())  # it trained
    config.checkpoint, config.steps, config.save_dir = str(tmp_path / "reader"), 0, None  # evaluate only
    assert [point["step"] for point in job.main(config)["curve"]] == [0]
    with pytest.raises(SystemExit, match="distractor_source"):
        job.main(job.ReadGoldConfig(data_dir=str(root), distractor_source="random"))
    with pytest.raises(SystemExit, match="eval_swapped >= 0"):
        job.main(job.ReadGoldConfig(data_dir=str(root), eval_swapped=-1))
