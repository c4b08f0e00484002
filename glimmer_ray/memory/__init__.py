"""Pre-computed passage memory: codecs, the sharded store with its manifest, the Ray Data build."""

from glimmer_ray.memory.codecs import CODECS, make_codec
from glimmer_ray.memory.store import (
    LRUMemoryCache,
    MemoryEncoderMismatch,
    MemoryStore,
    MemoryStoreError,
    memory_encoder_fingerprint,
)

__all__ = [
    "CODECS",
    "make_codec",
    "LRUMemoryCache",
    "MemoryEncoderMismatch",
    "MemoryStore",
    "MemoryStoreError",
    "memory_encoder_fingerprint",
]
