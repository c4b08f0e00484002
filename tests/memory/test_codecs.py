"""Memory codecs: stated bytes per token, round-trip error within each format's precision, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from glimmer_ray.memory.codecs import CODECS, make_codec

WIDTH = 64


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    # residual-stream-like: per-token scale varies over two orders of magnitude
    return (rng.standard_normal((300, WIDTH)) * rng.uniform(0.1, 30.0, size=(300, 1))).astype(np.float32)


def _codec(name: str, vectors: np.ndarray):
    codec = make_codec(name, WIDTH, num_subvectors=16)
    if name == "pq":
        codec.train(vectors)
    return codec


@pytest.mark.parametrize("name", CODECS)
def test_payload_has_the_stated_bytes_per_token(name, vectors):
    codec = _codec(name, vectors)
    payload, scales = codec.encode(vectors[:7])
    assert len(payload) + len(scales) == 7 * codec.bytes_per_token(WIDTH)
    assert codec.decode(payload, scales, WIDTH).shape == (7, WIDTH)


def test_bytes_per_token_are_those_of_the_formats():
    assert [make_codec(n, WIDTH, num_subvectors=16).bytes_per_token(WIDTH) for n in CODECS] == [
        4 * WIDTH,
        2 * WIDTH,
        2 * WIDTH,
        WIDTH + 4,
        16,
    ]


def test_fp32_is_exact(vectors):
    codec = _codec("fp32", vectors)
    assert np.array_equal(codec.decode(*codec.encode(vectors), WIDTH), vectors)


@pytest.mark.parametrize("name, mantissa_bits", [("bf16", 8), ("fp16", 11)])
def test_half_precision_error_is_half_an_ulp(name, mantissa_bits, vectors):
    codec = _codec(name, vectors)
    decoded = codec.decode(*codec.encode(vectors), WIDTH)
    relative = np.abs(decoded - vectors) / np.maximum(np.abs(vectors), 1e-30)
    assert relative.max() <= 2.0**-mantissa_bits
    assert relative.max() > 0


def test_bf16_rounds_like_torch(vectors):
    import torch

    codec = _codec("bf16", vectors)
    reference = torch.from_numpy(vectors).to(torch.bfloat16).float().numpy()
    assert np.array_equal(codec.decode(*codec.encode(vectors), WIDTH), reference)


def test_int8_error_is_at_most_half_a_step_per_token(vectors):
    codec = _codec("int8", vectors)
    decoded = codec.decode(*codec.encode(vectors), WIDTH)
    step = np.abs(vectors).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(decoded - vectors) <= step / 2 + 1e-6 * step)
    assert np.allclose(np.abs(decoded).max(axis=1), np.abs(vectors).max(axis=1), rtol=1e-6)


def test_pq_reconstructs_better_than_the_mean(vectors):
    codec = _codec("pq", vectors)
    decoded = codec.decode(*codec.encode(vectors), WIDTH)
    error = np.mean((decoded - vectors) ** 2)
    baseline = np.mean((vectors - vectors.mean(0)) ** 2)
    assert error < 0.5 * baseline


def test_pq_round_trips_its_codebook(vectors):
    codec = _codec("pq", vectors)
    again = make_codec("pq", WIDTH, num_subvectors=16, centroids=codec.centroids())
    payload, scales = codec.encode(vectors)
    assert np.array_equal(again.decode(payload, scales, WIDTH), codec.decode(payload, scales, WIDTH))


def test_bad_codec_use_is_refused(vectors):
    with pytest.raises(ValueError, match="beyond fp16's range"):
        make_codec("fp16", WIDTH).encode(np.full((2, WIDTH), 1e5, dtype=np.float32))
    with pytest.raises(ValueError, match="unknown memory codec 'int4'"):
        make_codec("int4", WIDTH)
    with pytest.raises(ValueError, match="does not divide"):
        make_codec("pq", WIDTH, num_subvectors=10)
    with pytest.raises(RuntimeError, match="no codebook"):
        make_codec("pq", WIDTH).encode(vectors)
    with pytest.raises(ValueError, match="at least 256"):
        make_codec("pq", WIDTH).train(vectors[:100])
