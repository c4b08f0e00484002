"""KILT formats: task files, the knowledge source, passages chunked from it, and predictions.

Task files (Petroni et al. 2021), one JSON object a line:
    {"id", "input", "output": [{"answer", "provenance": [{"wikipedia_id", "title",
     "start_paragraph_id", "end_paragraph_id", ...}]}], "meta"?}
Knowledge source, one page a line:
    {"wikipedia_id", "wikipedia_title", "text": [paragraph, ...], ...}
Predictions, KILT's submission format (one file per task), scored by `kilt/eval_downstream.py`:
    {"id", "output": [{"answer", "provenance": [{"wikipedia_id"}, ...]}]}

Every reader names the file and line of a malformed record. With `skip_invalid=True` bad lines are
skipped and counted instead (`ReadReport`), for the large public files that carry a few.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


class KiltFormatError(ValueError):
    """A record that does not follow the KILT format; the message names file and line."""


@dataclass
class ReadReport:
    """What a reader kept and skipped."""

    path: str
    read: int = 0
    skipped: int = 0
    first_errors: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        self.skipped += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(message)


def _lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def _parse(path, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise KiltFormatError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise KiltFormatError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    return record


def _check_example(record: dict[str, Any], where: str, require_output: bool) -> dict[str, Any]:
    if "id" not in record or str(record["id"]).strip() == "":
        raise KiltFormatError(f"{where}: missing 'id'")
    if not isinstance(record.get("input"), str) or not record["input"].strip():
        raise KiltFormatError(f"{where}: 'input' must be a non-empty string")
    outputs = record.get("output")
    if outputs is None:
        if require_output:
            raise KiltFormatError(f"{where}: missing 'output' (gold answers); pass require_output=False for test files")
        return record
    if not isinstance(outputs, list):
        raise KiltFormatError(f"{where}: 'output' must be a list")
    for output in outputs:
        if not isinstance(output, dict):
            raise KiltFormatError(f"{where}: every 'output' entry must be an object")
        for provenance in output.get("provenance", []) or []:
            if not isinstance(provenance, dict) or "wikipedia_id" not in provenance:
                raise KiltFormatError(f"{where}: every provenance needs a 'wikipedia_id'")
    if require_output and not any(isinstance(o.get("answer"), str) and o["answer"].strip() for o in outputs):
        raise KiltFormatError(f"{where}: no output has a non-empty 'answer'")
    return record


def read_kilt_examples(
    path: str | os.PathLike,
    require_output: bool = True,
    skip_invalid: bool = False,
) -> tuple[list[dict[str, Any]], ReadReport]:
    """Read a KILT task file. Duplicate ids are always an error (KILT's scorer refuses them)."""
    report = ReadReport(os.fspath(path))
    examples, seen = [], {}
    for number, line in _lines(path):
        where = f"{path}:{number}"
        try:
            record = _check_example(_parse(path, number, line), where, require_output)
        except KiltFormatError as error:
            if not skip_invalid:
                raise
            report.note(str(error))
            continue
        key = str(record["id"]).strip()
        if key in seen:
            raise KiltFormatError(f"{where}: duplicate id {key!r} (first on line {seen[key]})")
        seen[key] = number
        examples.append(record)
        report.read += 1
    return examples, report


def read_knowledge_source(
    path: str | os.PathLike, skip_invalid: bool = False
) -> tuple[list[dict[str, Any]], ReadReport]:
    """Read KILT knowledge-source pages; `wikipedia_id` must be unique and `text` a list of strings."""
    report = ReadReport(os.fspath(path))
    pages, seen = [], {}
    for number, line in _lines(path):
        where = f"{path}:{number}"
        try:
            record = _parse(path, number, line)
            if "wikipedia_id" not in record:
                raise KiltFormatError(f"{where}: missing 'wikipedia_id'")
            if not isinstance(record.get("wikipedia_title"), str):
                raise KiltFormatError(f"{where}: missing 'wikipedia_title'")
            text = record.get("text")
            if not isinstance(text, list) or not all(isinstance(p, str) for p in text):
                raise KiltFormatError(f"{where}: 'text' must be a list of paragraph strings")
        except KiltFormatError as error:
            if not skip_invalid:
                raise
            report.note(str(error))
            continue
        key = str(record["wikipedia_id"])
        if key in seen:
            raise KiltFormatError(f"{where}: duplicate wikipedia_id {key!r} (first on line {seen[key]})")
        seen[key] = number
        pages.append(record)
        report.read += 1
    if not pages:
        raise KiltFormatError(f"{path}: the knowledge source holds no page")
    return pages, report


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write records one a line, atomically (a temporary file renamed into place). Returns the count."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    count = 0
    with open(temporary, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    os.replace(temporary, path)
    return count


def prediction_record(example_id: str, answer: str, page_ids: Iterable[str] = ()) -> dict[str, Any]:
    """One line of KILT's submission format: the answer and the ranked provenance pages."""
    return {
        "id": example_id,
        "output": [{"answer": answer, "provenance": [{"wikipedia_id": str(p)} for p in page_ids]}],
    }


def gold_answers(example: dict[str, Any]) -> list[str]:
    """Distinct non-empty answers of a KILT example, as KILT's scorer collects them."""
    answers = []
    for output in example.get("output", []):
        answer = output.get("answer")
        if isinstance(answer, str) and answer.strip() and answer.strip() not in answers:
            answers.append(answer.strip())
    return answers


def gold_provenance(example: dict[str, Any]) -> list[list[str]]:
    """Gold page ids of each output that has provenance (KILT's evidence sets)."""
    sets = []
    for output in example.get("output", []):
        if "provenance" in output:
            sets.append(sorted({str(p["wikipedia_id"]) for p in output["provenance"]}))
    return sets


def gold_paragraphs(example: dict[str, Any]) -> list[list[tuple[str, int | None, int | None]]]:
    """Gold evidence of each output with provenance at paragraph level: per evidence set, its items as
    (wikipedia_id, start_paragraph_id, end_paragraph_id); paragraph ids are None where KILT gives none."""
    sets = []
    for output in example.get("output", []):
        if "provenance" in output:
            sets.append(
                [
                    (
                        str(p["wikipedia_id"]),
                        p.get("start_paragraph_id"),
                        p.get("end_paragraph_id", p.get("start_paragraph_id")),
                    )
                    for p in output["provenance"]
                ]
            )
    return sets


def gold_passages(
    evidence: list[list[tuple[str, int | None, int | None]]], passages_by_page: dict[str, list[tuple[int, int, str]]]
) -> list[list[list[str]]]:
    """The passages holding each gold evidence item: per evidence set, per item, the ids of the passages of
    its page whose paragraph range overlaps the item's (every passage of the page when the item names no
    paragraph). `passages_by_page`: wikipedia_id -> [(start_paragraph_id, end_paragraph_id, passage_id)]."""
    sets = []
    for items in evidence:
        covered = []
        for page, start, end in items:
            candidates = passages_by_page.get(str(page), [])
            if start is None:
                covered.append([pid for _, _, pid in candidates])
            else:
                last = start if end is None else end
                covered.append([pid for first, final, pid in candidates if first <= last and start <= final])
        sets.append(covered)
    return sets


# ---- passages ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Passage:
    """At most `max_words` words of one page, with the paragraphs they come from."""

    passage_id: str
    wikipedia_id: str
    title: str
    text: str
    start_paragraph_id: int
    end_paragraph_id: int


def chunk_page(page: dict[str, Any], max_words: int = 200) -> list[Passage]:
    """Split a page into passages of at most `max_words` words, never crossing a passage boundary
    inside a word. Paragraphs are packed whole while they fit; a longer paragraph is cut into
    windows. Paragraph 0 of a KILT page repeats the title and is skipped, as are empty paragraphs."""
    if max_words < 1:
        raise ValueError(f"max_words must be positive, got {max_words}")
    wikipedia_id, title = str(page["wikipedia_id"]), page["wikipedia_title"]
    passages: list[Passage] = []
    words: list[str] = []
    start = end = None

    def flush() -> None:
        nonlocal words, start
        if words:
            passages.append(
                Passage(f"{wikipedia_id}_{len(passages)}", wikipedia_id, title, " ".join(words), start, end)
            )
        words, start = [], None

    for index, paragraph in enumerate(page["text"]):
        paragraph_words = paragraph.split()
        if not paragraph_words or (index == 0 and paragraph.strip() == title.strip()):
            continue
        if words and len(words) + len(paragraph_words) > max_words:
            flush()
        while len(paragraph_words) > max_words:
            flush()
            start, end = index, index
            words = paragraph_words[:max_words]
            paragraph_words = paragraph_words[max_words:]
            flush()
        if paragraph_words:
            if start is None:
                start = index
            end = index
            words.extend(paragraph_words)
    flush()
    return passages
