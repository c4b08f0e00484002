"""How the reader reads (glimmer_ray.data.reading): the templates, the one passage tokenisation, and the
reading.json saved beside a model, with clear errors for a missing file, unknown fields or other templates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from glimmer_ray.data.reading import (
    READING_FILE,
    ReadingConfig,
    load_reading,
    parse_passage_text,
    passage_text,
    question_text,
    save_reading,
    tokenize_passages,
)
from glimmer_ray.data.tokenizer import save_tokenizer, train_t5_tokenizer

READING = ReadingConfig(question_tokens=24, passage_tokens=12, answer_tokens=6, num_passages=4, tasks=("nq", "fever"))


def test_templates_and_their_inverse():
    assert question_text("nq", "who wrote it") == "nq: who wrote it"
    assert passage_text("Kraxbrath", "A country. Its capital is Brandruxkin.") == (
        "title: Kraxbrath context: A country. Its capital is Brandruxkin."
    )
    assert parse_passage_text(passage_text("Kraxbrath", "A country. Its capital")) == (
        "Kraxbrath",
        "A country. Its capital",
    )


def test_passages_are_cut_and_padded_to_the_trained_length(tmp_path):
    from transformers import AutoTokenizer

    texts = ["a city", "a country whose capital is a city " * 4]
    save_tokenizer(train_t5_tokenizer([passage_text("T", t) for t in texts], vocab_size=120), tmp_path / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    ids, mask = tokenize_passages(tokenizer, ["T", "T"], texts, passage_tokens=12)
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == mask.dtype == np.int64
    assert mask[1].all() and not mask[0].all()  # the long passage is cut, the short one padded
    alone = tokenizer(passage_text("T", texts[0]))["input_ids"]
    assert ids[0, : mask[0].sum()].tolist() == alone and (ids[0, mask[0].sum() :] == tokenizer.pad_token_id).all()


def test_reading_json_round_trips_and_bad_files_are_refused(tmp_path):
    path = save_reading(str(tmp_path), READING)
    assert json.loads(open(path).read())["tasks"] == ["nq", "fever"]
    assert load_reading(str(tmp_path)) == READING
    with pytest.raises(FileNotFoundError, match="reading.json is missing: .* not exported by jobs/train.py"):
        load_reading(str(tmp_path / "elsewhere"))
    saved = json.loads((tmp_path / READING_FILE).read_text())
    (tmp_path / READING_FILE).write_text(json.dumps({**saved, "lq": 3}))
    with pytest.raises(ValueError, match="unknown field"):
        load_reading(str(tmp_path))
    (tmp_path / READING_FILE).write_text(json.dumps({**saved, "passage_template": "{title}. {text}"}))
    with pytest.raises(ValueError, match="trained with the templates"):
        load_reading(str(tmp_path))


def test_the_stream_tokenises_as_trained():
    from glimmer_ray.data.stream import TokenizeConfig

    assert TokenizeConfig.as_trained(READING) == TokenizeConfig(24, 12, 6, 4, 0)
    assert TokenizeConfig.as_trained(READING, num_passages=8, evidence_passages=2) == TokenizeConfig(24, 12, 6, 8, 2)
