"""KILT's evaluation metrics, defined exactly as `kilt/eval_downstream.py` and `kilt/eval_retrieval.py`.

Downstream (per example, maximised over the gold answers):
    exact match              SQuAD normalisation (lower case, drop punctuation and articles, squeeze
                             spaces)
    accuracy                 the stripped guess is one of the stripped gold answers, unnormalised (FEVER's
                             official metric: "supports" does not match "SUPPORTS")
    F1                       token overlap of the normalised strings
    ROUGE-L                  summary-level union-LCS F-measure of the `rouge` package (v1.0.1) KILT
                             calls, unnormalised: text split into sentences at '.', words at ' ',
                             word multisets collapsed to sets
Retrieval (page level, on `wikipedia_id`):
    R-precision              of the first R distinct predicted pages, R = gold pages of an output,
                             maximised over the gold outputs
    recall@k                 share of distinct gold evidence sets completed within the first k ranks,
                             a multi-page evidence set counting as one rank
Recall@m of the passages a reader keeps (ours; KILT has no such measure), per example 0 or 1:
    page level               the kept passages' pages hold every page of one gold evidence set
    passage level            the kept passages hold every gold evidence paragraph of one set
    (`covers_evidence`, `covers_passages`; `reranker_recall` and `retriever_recall` average them over a
    batch; `passage_recall` is the retriever's recall of its first k passages, KILT's at page level)
KILT-gated variants count an example's downstream score only when its R-precision is 1.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(prediction_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _lcs_words(reference: list[str], candidate: list[str]) -> list[str]:
    """One longest common subsequence of two word lists, backtracked as the `rouge` package does."""
    rows, cols = len(reference), len(candidate)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            if reference[i - 1] == candidate[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    words, i, j = [], rows, cols
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            words.append(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F as KILT computes it (`Rouge().get_scores(prediction, gold, avg=True)['rouge-l']['f']`)."""
    candidate = [" ".join(part.split()) for part in prediction.split(".") if part]
    reference = [" ".join(part.split()) for part in gold.split(".") if part]
    if not reference or not candidate:
        return 0.0  # the `rouge` package raises ValueError here and KILT scores the pair 0
    reference_words = len({word for sentence in reference for word in sentence.split(" ")})
    candidate_words = len({word for sentence in candidate for word in sentence.split(" ")})
    union: set[str] = set()
    overlap = 0
    for reference_sentence in reference:
        before = len(union)
        for candidate_sentence in candidate:
            union |= set(_lcs_words(reference_sentence.split(" "), candidate_sentence.split(" ")))
        overlap += len(union) - before
    recall, precision = overlap / reference_words, overlap / candidate_words
    return 2.0 * (precision * recall) / (precision + recall + 1e-8)


def _best(metric, prediction: str, golds: Iterable[str]) -> float:
    return max(metric(prediction, gold) for gold in golds)


# ---- retrieval (page level) ---------------------------------------------------------------


def _evidence_sets(gold_provenance: Sequence[Sequence[str]]) -> list[set[str]]:
    # As KILT: distinct sets, an output without provenance adding an (unreachable) empty set.
    sets: list[set[str]] = []
    for pages in gold_provenance:
        pages = {str(page).strip() for page in pages}
        if pages not in sets:
            sets.append(pages)
    return sets


def r_precision(gold_provenance: Sequence[Sequence[str]], predicted_pages: Sequence[str]) -> float:
    """`gold_provenance`: the gold page ids of each output; `predicted_pages`: ranked page ids."""
    best = 0.0
    for gold in gold_provenance:
        gold = {str(page).strip() for page in gold}
        if not gold:
            continue
        distinct: list[str] = []
        for page in predicted_pages:
            if page not in distinct:
                distinct.append(page)
                if len(distinct) == len(gold):
                    break
        best = max(best, sum(str(page).strip() in gold for page in distinct) / len(gold))
    return best


def recall_at_k(gold_provenance: Sequence[Sequence[str]], predicted_pages: Sequence[str], k: int) -> float:
    """KILT's recall@k: each distinct gold evidence set is one point of the ranking, placed where
    its last page appears; other pages are misses."""
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    evidence_sets = [set(pages) for pages in _evidence_sets(gold_provenance)]
    if not evidence_sets:
        return 0.0
    total_sets = len(evidence_sets)
    rank: list[object] = []
    for page in dict.fromkeys(str(page).strip() for page in predicted_pages):  # distinct, in rank order
        found = False
        for index, evidence in enumerate(evidence_sets):
            if page in evidence:
                found = True
                marker = f"evidence_set:{index}"
                if marker in rank:
                    rank.remove(marker)
                evidence.remove(page)
                rank.append(True if not evidence else marker)
        if not found:
            rank.append(False)
    return rank[:k].count(True) / total_sets


# ---- recall@m of kept passages (page and passage level) -----------------------------------------


def covers_evidence(gold_provenance: Sequence[Sequence[str]], pages: Iterable[str]) -> bool:
    """Page-level recall@m of one example: True when `pages` (of the kept passages) hold every page of at
    least one gold evidence set."""
    kept = {str(page) for page in pages}
    return any(set(map(str, evidence)) <= kept for evidence in gold_provenance if evidence)


def covers_passages(gold_passages: Sequence[Sequence[Sequence[str]]], passage_ids: Iterable[str]) -> bool:
    """Passage-level recall@m of one example: True when, for at least one gold evidence set, every item of it
    (a provenance paragraph) is in one of `passage_ids`. `gold_passages` comes from `kilt.gold_passages`:
    per evidence set, per item, the ids of the passages that hold it. Two passages of the gold page are
    told apart here, unlike in the page-level `covers_evidence`."""
    kept = {str(passage) for passage in passage_ids}
    return any(items and all(kept.intersection(map(str, holders)) for holders in items) for items in gold_passages)


def reranker_recall(
    selected: torch.Tensor | np.ndarray, candidates: np.ndarray, gold: np.ndarray, level: str = "page"
) -> float:
    """Recall@m of a batch: the mean over examples of 1 when the kept passages cover a complete gold evidence set.

    selected [b, m] indices into the k passages. At `level="page"` (KILT's granularity) candidates [b, k] are
    the k passages' page ids and gold [b] JSON lists of evidence sets (page ids); at `level="passage"`
    candidates are the k passage ids and gold the `gold_passages` JSON (per evidence set, per item, the
    passages holding it), so the passage of the gold page that holds the fact must be among the kept.
    """
    if level not in ("page", "passage"):
        raise ValueError(f"level must be 'page' or 'passage', got {level!r}")
    covers = covers_evidence if level == "page" else covers_passages
    hits = 0
    for row, ids, evidence in zip(selected.tolist(), candidates, gold):
        hits += covers(json.loads(evidence) if isinstance(evidence, str) else evidence, [ids[i] for i in row])
    return hits / max(1, len(selected))


def retriever_recall(num_selected: int, candidates: np.ndarray, gold: np.ndarray, level: str = "page") -> float:
    """The same measure for the retriever's own top m (the first m of the k retrieved)."""
    first = np.broadcast_to(np.arange(num_selected), (len(candidates), num_selected))  # [b, m]
    return reranker_recall(first, candidates, gold, level)


def prediction_recall(
    predictions: Sequence[dict], key: str = "kept_pages", level: str = "page", cutoff: int | None = None
) -> float:
    """Recall@m over prediction records (`eval.evaluate.predict`'s): the share whose passages `record[key]`
    (their first `cutoff`; None = all) cover a gold evidence set, at page level (`gold_pages`, KILT's
    granularity) or passage level (`gold_passages`)."""
    if level not in ("page", "passage"):
        raise ValueError(f"level must be 'page' or 'passage', got {level!r}")
    covers, gold = (covers_evidence, "gold_pages") if level == "page" else (covers_passages, "gold_passages")
    return sum(covers(record[gold], record[key][:cutoff]) for record in predictions) / max(1, len(predictions))


def passage_recall(gold: Sequence, ranked: Sequence[str], k: int, level: str = "page") -> float:
    """Recall of the first k of a retriever's ranked passages. At `level="page"`, `ranked` holds the passages'
    page ids and `gold` the gold provenance: KILT's recall over the distinct pages of the first k (a two-page
    evidence set counts only when both pages are among them). At `level="passage"`, `ranked` holds passage
    ids and `gold` the gold passages: `covers_passages` of the first k."""
    if level not in ("page", "passage"):
        raise ValueError(f"level must be 'page' or 'passage', got {level!r}")
    if level == "passage":
        return float(covers_passages(gold, ranked[:k]))
    pages = list(dict.fromkeys(ranked[:k]))  # passages -> distinct pages, in rank order
    return recall_at_k(gold, pages, max(1, len(pages)))


# ---- per example and per task ---------------------------------------------------------------


def score_example(
    prediction: str,
    gold_answers: Iterable[str],
    gold_provenance: Sequence[Sequence[str]] | None = None,
    predicted_pages: Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Every KILT metric for one example (retrieval ones only when pages are given)."""
    golds = [answer.strip() for answer in gold_answers if answer and answer.strip()]
    prediction = prediction.strip()
    if not golds:
        raise ValueError("an example without a gold answer cannot be scored")
    if prediction:
        scores = {
            "em": _best(exact_match, prediction, golds),
            "f1": _best(f1, prediction, golds),
            "accuracy": float(prediction in set(golds)),
            "rougel": _best(rouge_l, prediction, golds),
        }
    else:  # KILT skips an empty guess: it scores 0 on every downstream metric
        scores = dict.fromkeys(("em", "f1", "accuracy", "rougel"), 0.0)
    if gold_provenance is not None and predicted_pages is not None:
        rprec = r_precision(gold_provenance, predicted_pages) if predicted_pages else 0.0
        scores["rprec"] = rprec
        for k in ks:
            scores[f"recall@{k}"] = recall_at_k(gold_provenance, predicted_pages, k) if predicted_pages else 0.0
        gate = float(rprec == 1.0)
        for name in ("em", "f1", "rougel", "accuracy"):
            scores[f"kilt_{name}"] = gate * scores[name]
    return scores


def average(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over examples (KILT divides by the number of examples)."""
    if not scores:
        return {}
    return {key: sum(score[key] for score in scores) / len(scores) for key in scores[0]}
