"""KILT metrics pinned on hand-worked examples, ROUGE-L against the `rouge` package KILT calls, and recall@m of
kept and retrieved passages counted by hand."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from glimmer_ray.eval.metrics import (
    average,
    covers_passages,
    exact_match,
    f1,
    normalize_answer,
    passage_recall,
    prediction_recall,
    r_precision,
    recall_at_k,
    reranker_recall,
    retriever_recall,
    rouge_l,
    score_example,
)


def test_squad_normalisation():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("  theatre  ") == "theatre"  # 'the' inside a word stays


def test_exact_match_and_f1_hand_worked():
    assert exact_match("the Beatles", "Beatles") == 1.0
    assert exact_match("Beatles band", "Beatles") == 0.0
    # prediction 'paul mccartney singer' vs gold 'sir paul mccartney': 2 common, P = 2/3, R = 2/3
    assert f1("Paul McCartney, singer", "Sir Paul McCartney") == pytest.approx(2 / 3)
    assert f1("John", "Paul") == 0.0
    # repeated tokens count with multiplicity: 'a b b' vs 'b b c': common 2, P = R = 2/3
    assert f1("x y y", "y y z") == pytest.approx(2 / 3)


def test_rouge_l_hand_worked():
    # one sentence each; LCS of 'the cat sat' and 'the cat ran' is 'the cat': P = R = 2/3
    assert rouge_l("the cat sat", "the cat ran") == pytest.approx(2 / 3, abs=1e-7)
    # no normalisation: case matters
    assert rouge_l("The cat", "the cat") == pytest.approx(0.5, abs=1e-7)
    assert rouge_l("", "gold") == 0.0
    assert rouge_l("x", "...") == 0.0  # the rouge package raises on a gold without words; KILT scores it 0


def test_rouge_l_equals_the_rouge_package_kilt_uses():
    import rouge  # the package KILT calls (a test dependency)

    scorer = rouge.Rouge()
    generator = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "Alpha", "x"]
    for _ in range(300):

        def text():
            sentences = [
                " ".join(generator.choice(words) for _ in range(generator.randint(1, 6)))
                for _ in range(generator.randint(1, 3))
            ]
            return ". ".join(sentences)

        prediction, gold = text(), text()
        expected = scorer.get_scores(prediction, gold, avg=True)["rouge-l"]["f"]
        assert rouge_l(prediction, gold) == pytest.approx(expected, abs=1e-12), (prediction, gold)


def test_r_precision_hand_worked():
    # two gold outputs: {A} and {B, C}; the best one counts
    gold = [["A"], ["B", "C"]]
    assert r_precision(gold, ["B", "X", "C"]) == 0.5  # R = 2 for {B, C}: first 2 distinct are B, X
    assert r_precision(gold, ["A", "B"]) == 1.0  # R = 1 for {A}: first page is A
    assert r_precision(gold, ["X", "A"]) == 0.0  # {A}: first page X; {B, C}: first two X, A
    assert r_precision([["B", "C"]], ["C", "C", "B"]) == 1.0  # duplicates are skipped


def test_recall_at_k_hand_worked():
    # evidence sets {A} and {B, C}: ranking A, B, X, C -> ranks [True, set1, False] then C completes set1
    gold = [["A"], ["B", "C"]]
    assert recall_at_k(gold, ["A", "B", "X", "C"], 1) == 0.5
    assert recall_at_k(gold, ["A", "B", "X", "C"], 2) == 0.5  # rank: [True, False, True] after C moves set1 last
    assert recall_at_k(gold, ["A", "B", "X", "C"], 3) == 1.0
    assert recall_at_k([["A"], ["A"]], ["A"], 1) == 1.0  # duplicate evidence sets count once
    assert (
        recall_at_k([["A", "B"]], ["A", "A", "A", "A", "A", "B"], 5) == 1.0
    )  # repeated pages are one rank (KILT: 1.0)
    with pytest.raises(ValueError):
        recall_at_k(gold, ["A"], 0)


def test_kilt_gated_scores_count_only_with_perfect_r_precision():
    good = score_example("Paris", ["Paris"], [["p1"]], ["p1", "p2"])
    bad = score_example("Paris", ["Paris"], [["p1"]], ["p2", "p1"])
    assert good["em"] == bad["em"] == 1.0
    assert good["kilt_em"] == 1.0 and bad["kilt_em"] == 0.0
    assert bad["recall@5"] == 1.0 and bad["recall@1"] == 0.0
    means = average([good, bad])
    assert means["kilt_em"] == 0.5 and means["em"] == 1.0
    with pytest.raises(ValueError, match="without a gold answer"):
        score_example("x", [" "])


def test_accuracy_is_kilts_strict_match_and_empty_guesses_score_nothing():
    # KILT's accuracy (FEVER's official metric) compares stripped strings without normalisation
    lower = score_example("supports", ["SUPPORTS"], [["p1"]], ["p1"])
    assert lower["em"] == 1.0 and lower["accuracy"] == 0.0 and lower["kilt_accuracy"] == 0.0
    exact = score_example(" SUPPORTS ", ["SUPPORTS"], [["p1"]], ["p1"])
    assert exact["accuracy"] == exact["kilt_accuracy"] == 1.0
    assert score_example("the Paris", ["Paris"])["accuracy"] == 0.0
    # KILT skips an empty guess: even against the gold "The" (normalised to "") it scores 0
    empty = score_example("", ["The"])
    assert empty == {"em": 0.0, "f1": 0.0, "accuracy": 0.0, "rougel": 0.0}


def test_covers_passages_needs_every_item_of_one_evidence_set():
    two_hop = [[["a_0", "a_1"], ["b_2"]]]  # one set: an item held by a_0 or a_1, another by b_2
    assert covers_passages(two_hop, ["a_1", "b_2"]) and covers_passages(two_hop, ["b_2", "x", "a_0"])
    assert not covers_passages(two_hop, ["a_0", "a_1"]) and not covers_passages(two_hop, ["b_0"])
    either = [[["a_0"]], [["c_3"]]]  # two outputs, each its own evidence set
    assert covers_passages(either, ["c_3"]) and not covers_passages(either, ["a_1"])
    assert not covers_passages([], ["a_0"]) and not covers_passages([[]], ["a_0"])  # no evidence: never covered


def test_reranker_recall_needs_a_complete_evidence_set():
    pages = np.array([["a", "b", "c", "d"], ["a", "b", "c", "d"]], dtype=object)
    gold = np.array([json.dumps([["c"]]), json.dumps([["a", "d"]])], dtype=object)
    assert reranker_recall(torch.tensor([[2, 0], [0, 1]]), pages, gold) == 0.5  # ex 1 keeps a but not d
    assert reranker_recall(torch.tensor([[1, 0], [3, 0]]), pages, gold) == 0.5
    assert retriever_recall(2, pages, gold) == 0.0 and retriever_recall(4, pages, gold) == 1.0


def test_passage_recall_needs_the_passage_that_holds_the_fact():
    # two passages of page p; the fact sits in p_1 only. Page level counts either, passage level only p_1.
    pages = np.array([["p", "p", "q"]], dtype=object)
    keys = np.array([["p_0", "p_1", "q_0"]], dtype=object)
    gold_pages = np.array([json.dumps([["p"]])], dtype=object)
    gold_passages = np.array([json.dumps([[["p_1"]]])], dtype=object)
    assert reranker_recall(torch.tensor([[0]]), pages, gold_pages) == 1.0
    assert reranker_recall(torch.tensor([[0]]), keys, gold_passages, level="passage") == 0.0
    assert reranker_recall(torch.tensor([[1]]), keys, gold_passages, level="passage") == 1.0
    assert (
        retriever_recall(1, keys, gold_passages, level="passage") == 0.0
        and retriever_recall(2, keys, gold_passages, level="passage") == 1.0
    )
    with pytest.raises(ValueError, match="level"):
        reranker_recall(torch.tensor([[0]]), keys, gold_passages, level="paragraph")


def test_retrieved_passage_recall_hand_worked():
    # page level: KILT's recall over the distinct pages of the first k passages
    assert passage_recall([["a", "b"]], ["b", "b", "a", "c"], 2) == 0.0  # the first two are both of page b
    assert passage_recall([["a", "b"]], ["b", "b", "a", "c"], 3) == 1.0
    assert passage_recall([["a"], ["c"]], ["a", "b"], 2) == 0.5  # one of two evidence sets
    # passage level: the first k passages hold every gold paragraph of one evidence set
    gold = [[["a_0", "a_1"], ["b_2"]]]
    ranked = ["a_1", "x", "b_2"]
    assert passage_recall(gold, ranked, 2, level="passage") == 0.0
    assert passage_recall(gold, ranked, 3, level="passage") == 1.0
    with pytest.raises(ValueError, match="level"):
        passage_recall(gold, ["a_1"], 1, level="paragraph")


def test_prediction_recall_counts_records_whose_kept_passages_cover_an_evidence_set():
    records = [
        {
            "gold_pages": [["A"], ["B", "C"]],
            "kept_pages": ["C", "B"],
            "gold_passages": [[["a1"]]],
            "ranked": ["a2", "a1"],
        },
        {"gold_pages": [["A"]], "kept_pages": ["B", "B"], "gold_passages": [[["a1", "a3"]]], "ranked": ["a3", "x"]},
        {"gold_pages": [["B", "C"]], "kept_pages": ["B"], "gold_passages": [[["c"], ["d"]]], "ranked": ["d", "x", "c"]},
    ]
    assert prediction_recall(records) == pytest.approx(1 / 3)  # only the first covers a whole set ({B, C})
    assert prediction_recall(records, "ranked", "passage") == pytest.approx(1.0)
    assert prediction_recall(records, "ranked", "passage", cutoff=1) == pytest.approx(1 / 3)  # a1 not first; c third
    with pytest.raises(ValueError, match="level must be"):
        prediction_recall(records, level="token")
