"""Passages: the knowledge source's pages chunked into <= max_words-word passages (passages.parquet), and
the text the dense encoder reads for one."""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from glimmer_ray.data.kilt import chunk_page, read_knowledge_source

PASSAGE_COLUMNS = ("passage_id", "wikipedia_id", "title", "text", "start_paragraph_id", "end_paragraph_id")


def dense_passage_text(title: str, text: str) -> str:
    """What the dense encoder reads for a passage."""
    return f"{title}. {text}"


def write_passages(knowledge_path: str, output_path: str, max_words: int = 200) -> dict[str, Any]:
    """Chunk every page of a KILT knowledge source into passages and write them as Parquet."""
    pages, report = read_knowledge_source(knowledge_path)
    rows = {column: [] for column in PASSAGE_COLUMNS}
    for page in pages:
        for passage in chunk_page(page, max_words):
            for column in PASSAGE_COLUMNS:
                rows[column].append(getattr(passage, column))
    if not rows["passage_id"]:
        raise ValueError(f"{knowledge_path}: no passage could be made (all pages empty)")
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    temporary = f"{output_path}.tmp-{os.getpid()}"
    pq.write_table(pa.table(rows), temporary)
    os.replace(temporary, output_path)
    return {"pages": report.read, "passages": len(rows["passage_id"])}
