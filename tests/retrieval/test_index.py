"""FAISS passage index: exact search against numpy, approximate types, save/load, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from glimmer_ray.retrieval.index import IndexConfig, PassageIndex


def _corpus(count=400, dimension=32, seed=0):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, [f"p{i}" for i in range(count)]


def test_flat_index_is_exact_inner_product():
    vectors, ids = _corpus()
    index = PassageIndex.build(vectors, ids, IndexConfig(type="flat", use_gpu=False), "test-encoder")
    queries = vectors[:5] + 0.01
    scores, found = index.search(queries, 3)
    expected = np.argsort(-(queries @ vectors.T), axis=1)[:, :3]
    assert found == [[ids[j] for j in row] for row in expected]
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, expected, 1), rtol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_approximate_indexes_find_the_query_itself(kind):
    vectors, ids = _corpus(count=2000)
    config = IndexConfig(type=kind, nlist=16, nprobe=16, pq_m=8, use_gpu=False)
    index = PassageIndex.build(vectors, ids, config, "test-encoder")
    _, found = index.search(vectors[:50], 5)
    hits = sum(ids[i] in row for i, row in enumerate(found))
    assert hits >= 45  # PQ codes are lossy; the others should be near perfect
    assert index.manifest["type"] == kind and index.manifest["count"] == 2000


def test_save_load_round_trip(tmp_path):
    vectors, ids = _corpus()
    index = PassageIndex.build(vectors, ids, IndexConfig(use_gpu=False), "test-encoder")
    index.save(tmp_path / "index")
    loaded = PassageIndex.load(tmp_path / "index", use_gpu=False)
    assert loaded.passage_ids == ids and loaded.manifest["encoder"] == "test-encoder"
    assert index.search(vectors[:3], 4)[1] == loaded.search(vectors[:3], 4)[1]
    assert not list(tmp_path.glob("index.tmp-*"))


def test_bad_input_is_refused(tmp_path):
    vectors, ids = _corpus(count=10)
    with pytest.raises(ValueError, match="empty corpus"):
        PassageIndex.build(vectors[:0], [], IndexConfig(use_gpu=False), "e")
    with pytest.raises(ValueError, match="unique"):
        PassageIndex.build(vectors, ["same"] * 10, IndexConfig(use_gpu=False), "e")
    with pytest.raises(ValueError, match="unknown index type 'lsh'"):
        PassageIndex.build(vectors, ids, IndexConfig(type="lsh", use_gpu=False), "e")
    with pytest.raises(ValueError, match="pq_m 7 must divide"):
        PassageIndex.build(
            _corpus(count=500)[0], _corpus(count=500)[1], IndexConfig(type="ivfpq", nlist=4, pq_m=7, use_gpu=False), "e"
        )
    with pytest.raises(FileNotFoundError, match="not a passage index"):
        PassageIndex.load(tmp_path)
    index = PassageIndex.build(vectors, ids, IndexConfig(use_gpu=False), "e")
    index.save(tmp_path / "i")
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    (tmp_path / "i" / "manifest.json").write_text(json.dumps({**manifest, "count": 11}))
    with pytest.raises(ValueError, match="does not match its manifest"):
        PassageIndex.load(tmp_path / "i", use_gpu=False)
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(vectors[:1], 0)
