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
