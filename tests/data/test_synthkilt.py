"""The bundled benchmark: deterministic, KILT-formatted, answerable only from its own pages."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from transformers import AutoTokenizer

from glimmer_ray.data import synthkilt
from glimmer_ray.data.kilt import gold_answers, read_kilt_examples, read_knowledge_source
from glimmer_ray.data.tokenizer import save_tokenizer, train_t5_tokenizer


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthkilt")
    return directory, synthkilt.generate(directory, "tiny", seed=3)


def test_same_seed_same_bytes_other_seed_other_world(tiny_benchmark, tmp_path):
    directory, manifest = tiny_benchmark
    again = synthkilt.generate(tmp_path / "again", "tiny", seed=3)
    assert again["sha256"] == manifest["sha256"]
    other = synthkilt.generate(tmp_path / "other", "tiny", seed=4)
    assert other["sha256"]["knowledge.jsonl"] != manifest["sha256"]["knowledge.jsonl"]
    assert manifest["version"] == synthkilt.VERSION and manifest["scale"] == "tiny"


def test_every_task_and_split_in_kilt_format(tiny_benchmark):
    directory, manifest = tiny_benchmark
    scale = synthkilt.SCALES["tiny"]
    for task in synthkilt.TASKS:
        train, _ = read_kilt_examples(directory / f"{task}-train-kilt.jsonl")
        dev, _ = read_kilt_examples(directory / f"{task}-dev-kilt.jsonl")
        assert len(train) == scale.train_per_task and len(dev) == scale.dev_per_task
        assert all(example["output"][0]["provenance"] for example in train + dev)


def test_gold_provenance_states_the_answer(tiny_benchmark):
    directory, _ = tiny_benchmark
    pages, _ = read_knowledge_source(directory / "knowledge.jsonl")
    by_id = {page["wikipedia_id"]: page for page in pages}
    for task in ("nq", "tqa", "zsre", "trex", "hotpotqa"):
        examples, _ = read_kilt_examples(directory / f"{task}-dev-kilt.jsonl")
        for example in examples:
            provenance = example["output"][0]["provenance"]
            answer = gold_answers(example)[0]
            last = provenance[-1]  # for two-hop questions the answer is on the second page
            paragraph = by_id[last["wikipedia_id"]]["text"][last["start_paragraph_id"]]
            assert answer in paragraph, (task, example["input"], answer)
            if task == "hotpotqa":
                assert len({p["wikipedia_id"] for p in provenance}) == 2


def test_dev_asks_about_subjects_never_asked_in_train(tiny_benchmark):
    directory, _ = tiny_benchmark
    for task in synthkilt.TASKS:
        train, _ = read_kilt_examples(directory / f"{task}-train-kilt.jsonl")
        dev, _ = read_kilt_examples(directory / f"{task}-dev-kilt.jsonl")
        train_subjects = {example["meta"]["subject"] for example in train}
        assert not train_subjects & {example["meta"]["subject"] for example in dev}


def test_a_facts_seed_twin_has_the_same_entities_and_words_but_other_facts(tiny_benchmark, tmp_path):
    directory, manifest = tiny_benchmark
    twin = synthkilt.generate(tmp_path / "twin", "tiny", seed=3, facts_seed=1)
    assert twin["facts_seed"] == 1 and manifest["facts_seed"] is None
    assert synthkilt.generate(tmp_path / "again", "tiny", seed=3, facts_seed=1)["sha256"] == twin["sha256"]
    pages, _ = read_knowledge_source(directory / "knowledge.jsonl")
    twin_pages, _ = read_knowledge_source(tmp_path / "twin" / "knowledge.jsonl")
    assert [p["wikipedia_title"] for p in pages] == [p["wikipedia_title"] for p in twin_pages]
    words = lambda corpus: {word for page in corpus for paragraph in page["text"] for word in paragraph.split()}  # noqa: E731
    assert words(twin_pages) == words(pages)  # a pre-training corpus for this benchmark's tokenizer: no word unseen
    assert [p["text"] for p in twin_pages] != [p["text"] for p in pages]
    # the facts moved: a dev question of the original world rarely finds its answer on its subject's twin page
    by_title = {page["wikipedia_title"]: " ".join(page["text"][1:]) for page in twin_pages}
    examples, _ = read_kilt_examples(directory / "nq-dev-kilt.jsonl")
    still_true = [gold_answers(e)[0] in by_title[e["meta"]["subject"]] for e in examples]
    assert sum(still_true) <= 0.4 * len(examples), sum(still_true)


def test_fever_claims_are_balanced_and_refutations_are_plausible(tiny_benchmark):
    directory, _ = tiny_benchmark
    examples, _ = read_kilt_examples(directory / "fever-train-kilt.jsonl")
    labels = Counter(gold_answers(example)[0] for example in examples)
    assert set(labels) == {"SUPPORTS", "REFUTES"} and min(labels.values()) > len(examples) / 4


def test_unknown_scale_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        synthkilt.generate(tmp_path, "huge")


def test_t5_style_tokenizer_round_trips(tiny_benchmark, tmp_path):
    directory, _ = tiny_benchmark
    pages, _ = read_knowledge_source(directory / "knowledge.jsonl")
    tokenizer = train_t5_tokenizer((" ".join(page["text"]) for page in pages), vocab_size=500)
    save_tokenizer(tokenizer, tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
    assert loaded.convert_tokens_to_ids("<extra_id_0>") == len(loaded) - 1
    text = pages[5]["text"][1]
    ids = loaded(text).input_ids
    assert ids[-1] == loaded.eos_token_id
    assert loaded.decode(ids, skip_special_tokens=True) == " ".join(text.split())
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"


def test_a_split_seed_twin_asks_in_train_about_the_benchmark_dev_subjects(tiny_benchmark, tmp_path):
    directory, manifest = tiny_benchmark
    twin = synthkilt.generate(tmp_path / "twin", "tiny", seed=3, facts_seed=1, split_seed=1)
    assert twin["split_seed"] == 1 and manifest["split_seed"] is None
    same_split = synthkilt.generate(tmp_path / "same", "tiny", seed=3, facts_seed=1)
    assert (
        twin["sha256"]["knowledge.jsonl"] == same_split["sha256"]["knowledge.jsonl"]
    )  # the same pages, only the split moved

    def asked(path, split):
        return {
            example["meta"]["subject"]
            for task in synthkilt.TASKS
            for example in read_kilt_examples(path / f"{task}-{split}-kilt.jsonl")[0]
        }

    benchmark_dev = asked(directory, "dev")
    assert not asked(tmp_path / "same", "train") & benchmark_dev
    assert len(asked(tmp_path / "twin", "train") & benchmark_dev) >= len(benchmark_dev) // 2
    twin_train, twin_dev = asked(tmp_path / "twin", "train"), asked(tmp_path / "twin", "dev")
    assert not twin_train & twin_dev  # within the twin, train and dev subjects stay apart
