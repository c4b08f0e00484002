"""KILT formats: reading with clear errors, chunking, predictions."""

from __future__ import annotations

import json

import pytest

from glimmer_ray.data.kilt import (
    KiltFormatError,
    chunk_page,
    gold_answers,
    gold_paragraphs,
    gold_passages,
    gold_provenance,
    prediction_record,
    read_kilt_examples,
    read_knowledge_source,
    write_jsonl,
)

EXAMPLE = {
    "id": "q1",
    "input": "who wrote the book",
    "output": [
        {
            "answer": "Ann Smith",
            "provenance": [
                {"wikipedia_id": "12", "title": "Ann Smith", "start_paragraph_id": 1, "end_paragraph_id": 1}
            ],
        },
        {"answer": "Ann Smith"},
        {"answer": "A. Smith", "provenance": [{"wikipedia_id": "12"}, {"wikipedia_id": "40"}]},
    ],
}


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_reads_examples_and_gold(tmp_path):
    path = _write(tmp_path / "nq-dev-kilt.jsonl", [json.dumps(EXAMPLE), "", json.dumps({**EXAMPLE, "id": "q2"})])
    examples, report = read_kilt_examples(path)
    assert [e["id"] for e in examples] == ["q1", "q2"] and report.read == 2 and report.skipped == 0
    assert gold_answers(examples[0]) == ["Ann Smith", "A. Smith"]
    assert gold_provenance(examples[0]) == [["12"], ["12", "40"]]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"input": "x", "output": [{"answer": "y"}]}), "missing 'id'"),
        (json.dumps({"id": "a", "input": "", "output": [{"answer": "y"}]}), "'input' must be a non-empty string"),
        (json.dumps({"id": "a", "input": "x"}), "missing 'output'"),
        (
            json.dumps({"id": "a", "input": "x", "output": [{"answer": "y", "provenance": [{"title": "t"}]}]}),
            "needs a 'wikipedia_id'",
        ),
        (json.dumps({"id": "a", "input": "x", "output": [{"answer": " "}]}), "no output has a non-empty 'answer'"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [json.dumps(EXAMPLE), line])
    with pytest.raises(KiltFormatError, match=rf"bad.jsonl:2: .*{message}"):
        read_kilt_examples(path)


def test_skip_invalid_counts_what_it_skips(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [json.dumps(EXAMPLE), "{oops", json.dumps({**EXAMPLE, "id": "q3"}), "[]"])
    examples, report = read_kilt_examples(path, skip_invalid=True)
    assert len(examples) == 2 and report.skipped == 2 and "mixed.jsonl:2" in report.first_errors[0]


def test_duplicate_ids_are_always_an_error(tmp_path):
    path = _write(tmp_path / "dup.jsonl", [json.dumps(EXAMPLE), json.dumps(EXAMPLE)])
    with pytest.raises(KiltFormatError, match=r"dup.jsonl:2: duplicate id 'q1' \(first on line 1\)"):
        read_kilt_examples(path, skip_invalid=True)


def test_test_files_without_output(tmp_path):
    path = _write(tmp_path / "test.jsonl", [json.dumps({"id": "t1", "input": "question"})])
    examples, _ = read_kilt_examples(path, require_output=False)
    assert examples[0]["id"] == "t1"


def test_knowledge_source_checks(tmp_path):
    page = {"wikipedia_id": "7", "wikipedia_title": "Page", "text": ["Page\n", "First paragraph."]}
    pages, _ = read_knowledge_source(_write(tmp_path / "ks.jsonl", [json.dumps(page)]))
    assert pages[0]["wikipedia_id"] == "7"
    with pytest.raises(KiltFormatError, match=r"ks2.jsonl:2: duplicate wikipedia_id"):
        read_knowledge_source(_write(tmp_path / "ks2.jsonl", [json.dumps(page), json.dumps(page)]))
    with pytest.raises(KiltFormatError, match="list of paragraph strings"):
        read_knowledge_source(_write(tmp_path / "ks3.jsonl", [json.dumps({**page, "text": "flat"})]))
    with pytest.raises(KiltFormatError, match="holds no page"):
        read_knowledge_source(_write(tmp_path / "ks4.jsonl", [""]))


def test_chunking_keeps_pages_paragraphs_and_word_limit():
    page = {
        "wikipedia_id": "9",
        "wikipedia_title": "Title",
        "text": ["Title", "one two three", "", "four five", "a " * 12 + "end", "six"],
    }
    passages = chunk_page(page, max_words=5)
    assert all(len(p.text.split()) <= 5 for p in passages)
    assert [p.text for p in passages] == ["one two three four five", "a a a a a", "a a a a a", "a a end six"]
    assert [(p.start_paragraph_id, p.end_paragraph_id) for p in passages] == [(1, 3), (4, 4), (4, 4), (4, 5)]
    assert {p.wikipedia_id for p in passages} == {"9"} and passages[0].passage_id == "9_0"
    # every word of the page (but the title paragraph) is in exactly one passage, in order
    assert " ".join(p.text for p in passages).split() == " ".join(page["text"][1:]).split()
    with pytest.raises(ValueError):
        chunk_page(page, 0)


def test_gold_passages_are_the_passages_holding_the_provenance_paragraphs():
    page = {
        "wikipedia_id": "12",
        "wikipedia_title": "Ann Smith",
        "text": ["Ann Smith", "one two three", "four five", "a " * 12 + "end", "six"],
    }
    by_page = {}
    for passage in chunk_page(page, max_words=5):  # 12_0 = paragraphs 1-2, 12_1..12_3 = paragraph 3 (12_3 also 4)
        by_page.setdefault(passage.wikipedia_id, []).append(
            (passage.start_paragraph_id, passage.end_paragraph_id, passage.passage_id)
        )
    evidence = gold_paragraphs(EXAMPLE)
    assert evidence == [
        [("12", 1, 1)],
        [("12", None, None), ("40", None, None)],
    ]  # the output without provenance adds no set
    assert gold_passages(evidence, by_page) == [
        [["12_0"]],
        [["12_0", "12_1", "12_2", "12_3"], []],
    ]  # page 40 is not in the corpus
    assert gold_passages([[("12", 3, 3)]], by_page) == [[["12_1", "12_2", "12_3"]]]  # a paragraph cut into windows
    assert gold_passages([[("12", 2, 4)]], by_page) == [
        [["12_0", "12_1", "12_2", "12_3"]]
    ]  # a range overlapping several


def test_predictions_in_kilt_submission_format(tmp_path):
    path = tmp_path / "out" / "nq-dev-kilt.jsonl"
    assert write_jsonl(path, [prediction_record("q1", "Ann Smith", ["12", "40"])]) == 1
    line = json.loads(path.read_text())
    assert line == {
        "id": "q1",
        "output": [{"answer": "Ann Smith", "provenance": [{"wikipedia_id": "12"}, {"wikipedia_id": "40"}]}],
    }
    assert not list(path.parent.glob("*.tmp-*"))
