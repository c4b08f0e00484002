"""The prepare_worlds job (`glimmer_ray.data.worlds`) on a real local Ray cluster with the packaged MiniLM encoder: fresh
worlds, one tokenizer, each world retrieved in its own index, held-out worlds never in the train stream, and a
run that resumes at the first unfinished world."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from glimmer_ray.data import synthkilt
from glimmer_ray.data.worlds import WorldsConfig, prepare_worlds
from glimmer_ray.retrieval.index import PassageIndex

pytestmark = pytest.mark.ray
TASKS = ["nq", "hotpotqa"]


def config(root, **overrides) -> WorldsConfig:
    fields = dict(
        output_dir=str(root),
        scale="tiny",
        first_seed=50,
        train_worlds=2,
        dev_worlds=1,
        tasks=TASKS,
        tokenizer_worlds=1,
        num_passages=5,
        recall_ks=[1, 5],
        batch_size=32,
    )
    return WorldsConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def worlds(ray_cluster, tmp_path_factory, load_job):
    root = tmp_path_factory.mktemp("worlds")
    return root, load_job("prepare_worlds").main(config(root))  # joins the test's cluster (ray_address null)


def rows(path, columns):
    return pq.read_table(path, columns=columns).to_pylist()


def test_every_question_is_retrieved_in_its_own_world(worlds):
    root, report = worlds
    assert report["worlds"] == ["train-50", "train-51", "dev-52"]
    for task in TASKS:
        for split, names in (("train", ("train-50", "train-51")), ("dev", ("dev-52",))):
            merged = rows(root / "retrieved" / f"{task}-{split}.parquet", ["id", "passage_ids", "gold_ids"])
            # both splits of every world of that kind, and nothing else
            assert len(merged) == len(names) * (
                synthkilt.SCALES["tiny"].train_per_task + synthkilt.SCALES["tiny"].dev_per_task
            )
            assert {row["id"].rsplit("-", 3)[0] for row in merged} == set(names)
            assert len({row["id"] for row in merged}) == len(merged)
            for row in merged:
                world = row["id"].rsplit("-", 3)[0]
                assert len(row["passage_ids"]) == 5
                assert all(pid.startswith(world + "-") for pid in row["passage_ids"] + row["gold_ids"])


def test_held_out_worlds_are_the_dev_set_and_the_served_corpus(worlds):
    root, report = worlds
    train_pages = {
        pid
        for task in TASKS
        for row in rows(root / "retrieved" / f"{task}-train.parquet", ["passage_ids"])
        for pid in row["passage_ids"]
    }
    dev_passages = {row["passage_id"] for row in rows(root / "passages.parquet", ["passage_id"])}
    assert dev_passages and all(pid.startswith("dev-52-") for pid in dev_passages)
    assert not train_pages & dev_passages
    index = PassageIndex.load(root / "index", use_gpu=False)
    assert set(index.passage_ids) == dev_passages
    # names are fresh in every world: no page title is shared between the held-out world and a training world
    titles = {
        name: {row["title"] for row in rows(root / "worlds" / name / "passages.parquet", ["title"])}
        for name in report["worlds"]
    }
    assert not titles["dev-52"] & (titles["train-50"] | titles["train-51"])
    assert report["dev_passage_recall"]["nq"][5] > 0.9  # one-hop questions name their page
    assert os.path.isdir(root / "tokenizer") and not os.path.exists(root / "worlds" / "train-50" / "tokenizer")


def test_a_killed_run_resumes_at_the_unfinished_world(worlds, tmp_path):
    root, _ = worlds
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    # the kill came while train-51 was being retrieved and dev-52 was being embedded
    shutil.rmtree(copy / "worlds" / "train-51" / "retrieved")
    shutil.rmtree(copy / "worlds" / "dev-52" / "index")
    shutil.rmtree(copy / "worlds" / "dev-52" / "retrieved")
    kept = os.path.getmtime(copy / "worlds" / "train-50" / "retrieved" / "manifest.json")
    report = prepare_worlds(config(copy))
    assert report["embed"]["worlds"] == 1 and report["retrieve"]["worlds"] == 2
    assert os.path.getmtime(copy / "worlds" / "train-50" / "retrieved" / "manifest.json") == kept
    for task in TASKS:
        for split in ("train", "dev"):
            before = rows(root / "retrieved" / f"{task}-{split}.parquet", ["id", "passage_ids"])
            assert rows(copy / "retrieved" / f"{task}-{split}.parquet", ["id", "passage_ids"]) == before
    with open(copy / "worlds_report.json") as handle:
        assert json.load(handle)["retrieve"]["questions"] == report["retrieve"]["questions"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="dev_worlds"):
        config("/tmp/unused", dev_worlds=0).validate()
    with pytest.raises(ValueError, match="tokenizer_worlds"):
        config("/tmp/unused", tokenizer_worlds=3).validate()
    with pytest.raises(ValueError, match="unknown"):
        config("/tmp/unused", tasks=["nq", "squad"]).validate()
