"""Codecs for passage memory: how the memory encoder's token vectors [n, d] are stored as bytes.

Memory is T5's un-normalised residual stream (the final layer norm runs after the live encoder), so
its range grows with depth and width: fp16 can overflow on large models (the codec refuses rather
than storing inf), bf16 keeps fp32's range with 8 bits of mantissa, int8 scales every token by its own
max |x| / 127. The product quantiser (in the spirit of MEMORY-VQ, arXiv 2308.14903) stores M bytes a
token against a codebook trained on a sample of the memory.

Every codec maps float32 [n, d] -> (payload bytes, per-token scales or b"") and back.

    codec   bytes per token   exact
    fp32    4 d               yes
    bf16    2 d               no (8-bit mantissa, round to nearest even)
    fp16    2 d               no (10-bit mantissa; |x| must stay below 65504)
    int8    d + 4             no (per-token symmetric scale, a float32)
    pq      M                 no (faiss ProductQuantizer, 2^8 centroids per sub-vector)
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

CODECS = ("fp32", "bf16", "fp16", "int8", "pq")
FP16_MAX = float(np.finfo(np.float16).max)


class Codec:
    name: str

    def bytes_per_token(self, width: int) -> int:
        raise NotImplementedError

    def encode(self, vectors: np.ndarray) -> tuple[bytes, bytes]:
        """float32 [n, d] -> (payload, scales)."""
        raise NotImplementedError

    def decode(self, payload: memoryview | bytes, scales: memoryview | bytes, width: int) -> np.ndarray:
        """(payload, scales) -> float32 [n, d]."""
        raise NotImplementedError


class Float32Codec(Codec):
    name = "fp32"

    def bytes_per_token(self, width: int) -> int:
        return 4 * width

    def encode(self, vectors: np.ndarray) -> tuple[bytes, bytes]:
        return np.ascontiguousarray(vectors, dtype="<f4").tobytes(), b""

    def decode(self, payload, scales, width: int) -> np.ndarray:
        return np.frombuffer(payload, dtype="<f4").reshape(-1, width)  # [n, d], zero-copy


class Float16Codec(Codec):
    name = "fp16"

    def bytes_per_token(self, width: int) -> int:
        return 2 * width

    def encode(self, vectors: np.ndarray) -> tuple[bytes, bytes]:
        peak = float(np.abs(vectors).max(initial=0.0))
        if not np.isfinite(peak) or peak > FP16_MAX:
            raise ValueError(
                f"memory values reach {peak:.4g}, beyond fp16's range ({FP16_MAX:.0f}): T5's un-normalised residual "
                "stream overflows fp16; use codec bf16 or int8"
            )
        return vectors.astype("<f2").tobytes(), b""

    def decode(self, payload, scales, width: int) -> np.ndarray:
        return _widen(payload, torch.float16).reshape(-1, width)


class BFloat16Codec(Codec):
    """bf16 via torch's rounding (round to nearest even); stored as the upper 16 bits of float32."""

    name = "bf16"

    def bytes_per_token(self, width: int) -> int:
        return 2 * width

    def encode(self, vectors: np.ndarray) -> tuple[bytes, bytes]:
        halves = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(torch.bfloat16)
        return halves.view(torch.int16).numpy().astype("<i2").tobytes(), b""

    def decode(self, payload, scales, width: int) -> np.ndarray:
        return _widen(payload, torch.bfloat16).reshape(-1, width)


class Int8Codec(Codec):
    """Symmetric per-token quantisation: q = round(x / s), s = max|x| / 127 (a float32 per token)."""

    name = "int8"

    def bytes_per_token(self, width: int) -> int:
        return width + 4

    def encode(self, vectors: np.ndarray) -> tuple[bytes, bytes]:
        vectors = np.asarray(vectors, dtype=np.float32)
        scale = np.abs(vectors).max(axis=1) / 127.0  # [n]
        scale = np.where(scale > 0, scale, 1.0).astype("<f4")
        quantised = np.clip(np.rint(vectors / scale[:, None]), -127, 127).astype(np.int8)  # [n, d]
        return quantised.tobytes(), scale.tobytes()

    def decode(self, payload, scales, width: int) -> np.ndarray:
        quantised = np.frombuffer(payload, dtype=np.int8).reshape(-1, width)  # [n, d]
        scale = np.frombuffer(scales, dtype="<f4")  # [n]
        return quantised.astype(np.float32) * scale[:, None]


class ProductQuantizerCodec(Codec):
    """faiss ProductQuantizer: the d-vector split into M sub-vectors, each replaced by one of 256
    centroids (one byte). Needs `train` on a sample of memory vectors before use; the centroids are
    part of the store (their bytes are listed in the manifest, not counted per token)."""

    name = "pq"

    def __init__(self, width: int, num_subvectors: int, centroids: np.ndarray | None = None) -> None:
        import faiss

        if width % num_subvectors:
            raise ValueError(f"pq needs num_subvectors to divide d_model: {num_subvectors} does not divide {width}")
        self.width, self.num_subvectors = width, num_subvectors
        self.quantizer = faiss.ProductQuantizer(width, num_subvectors, 8)
        self.trained = False
        if centroids is not None:
            faiss.copy_array_to_vector(
                np.ascontiguousarray(centroids, dtype=np.float32).ravel(), self.quantizer.centroids
            )
            self.trained = True

    def train(self, sample: np.ndarray) -> None:
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if len(sample) < 256:
            raise ValueError(
                f"pq training needs at least 256 token vectors, got {len(sample)}; build from more passages"
            )
        self.quantizer.train(sample)
        self.trained = True

    def centroids(self) -> np.ndarray:
        import faiss

        return faiss.vector_to_array(self.quantizer.centroids).reshape(self.num_subvectors, 256, -1)  # [M, 256, d/M]

    def bytes_per_token(self, width: int) -> int:
        return self.num_subvectors

    def _require_trained(self) -> None:
        if not self.trained:
            raise RuntimeError("the pq codec has no codebook yet: train it on a sample of memory vectors first")

    def encode(self, vectors: np.ndarray) -> tuple[bytes, bytes]:
        self._require_trained()
        return self.quantizer.compute_codes(np.ascontiguousarray(vectors, dtype=np.float32)).tobytes(), b""

    def decode(self, payload, scales, width: int) -> np.ndarray:
        self._require_trained()
        codes = np.frombuffer(payload, dtype=np.uint8).reshape(-1, self.num_subvectors)  # [n, M]
        return self.quantizer.decode(np.ascontiguousarray(codes))


def _widen(payload, dtype: torch.dtype) -> np.ndarray:
    """Little-endian 16-bit floats -> float32 [n * d] with torch's vectorised cast (3-4x numpy's for fp16). The
    payload is only read; torch warns that it cannot mark a read-only buffer (a mapped shard) as such."""
    if not len(payload):
        return np.zeros(0, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        halves = torch.frombuffer(payload, dtype=dtype)
    return halves.float().numpy()


def make_codec(name: str, width: int, num_subvectors: int = 16, centroids: np.ndarray | None = None) -> Codec:
    if name == "fp32":
        return Float32Codec()
    if name == "bf16":
        return BFloat16Codec()
    if name == "fp16":
        return Float16Codec()
    if name == "int8":
        return Int8Codec()
    if name == "pq":
        return ProductQuantizerCodec(width, num_subvectors, centroids)
    raise ValueError(f"unknown memory codec {name!r}; choose one of {', '.join(CODECS)}")
