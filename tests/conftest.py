"""Shared fixtures: tiny random T5.1.1 checkpoints saved in Hugging Face layout."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from glimmer_ray.model.random_t5 import save_random_t5, t5_1_1_config

torch.set_num_threads(min(2, os.cpu_count() or 1))

# DeepSpeed's CPU workers JIT-build its shared-memory op under torch's extension folder, guarded by a lock file that
# a killed build leaves behind (and every later build then waits on forever). The suite builds in a folder of its own,
# where no other process builds, and clears the locks a killed earlier session left there.
EXTENSIONS = pathlib.Path(__file__).resolve().parents[1] / "build" / "torch_extensions"
os.environ["TORCH_EXTENSIONS_DIR"] = str(EXTENSIONS)
for lock in EXTENSIONS.glob("*/lock"):
    lock.unlink()


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> str:
    """d_model 48, 4 + 4 layers, d_ff 128 (= 8 d / 3: the gated FFN holds 8 d^2 weights), no dropout."""
    config = t5_1_1_config(vocab_size=256, d_model=48, num_layers=4, num_heads=4, dropout_rate=0.0)
    return save_random_t5(tmp_path_factory.mktemp("tiny_t5"), config, seed=0)


@pytest.fixture(scope="session")
def tiny_t5_dropout_dir(tmp_path_factory) -> str:
    """The same shape with T5.1.1's dropout 0.1, for training tests."""
    config = t5_1_1_config(vocab_size=256, d_model=48, num_layers=4, num_heads=4, dropout_rate=0.1)
    return save_random_t5(tmp_path_factory.mktemp("tiny_t5_dropout"), config, seed=1)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster per test module that needs Ray (2 CPUs, as CI has)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def load_job():
    """Import a `jobs/<name>.py` script (`dev/<name>` for jobs/dev/) as a module (jobs are scripts, not a package)."""
    import importlib.util
    import pathlib
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"job_{name.replace('/', '_')}", root / "jobs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    return load


def _tiny_reader(directory, tokenizer_dir: str, seed: int) -> str:
    """A random 4-layer GLIMMER reader (m 2) with the tokenizer it reads with, saved in `directory`."""
    from transformers import AutoTokenizer

    from glimmer_ray.model.modeling import GlimmerForConditionalGeneration
    from glimmer_ray.model.random_t5 import random_t5

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    t5 = random_t5(
        t5_1_1_config(vocab_size=len(tokenizer), d_model=32, num_layers=4, num_heads=4, dropout_rate=0.0), seed=seed
    )
    GlimmerForConditionalGeneration.from_t5(
        t5, live_proportion=0.5, rerank_proportion=0.5, num_selected=2
    ).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def serve_artifacts(tmp_path_factory, load_job) -> dict:
    """What the Serve app serves, at the tiny scale: prepare_data's index and passages, a random reader exported
    with its reading.json (lq 24, lp 40, answers of 6 tokens, k 4, SynthKILT's tasks), its memory store, and a
    second reader of other weights (`other_model`, no memory of its own). `args` are the app's args for them.
    Built once a session on a Ray cluster of its own, stopped before any module's `ray_cluster` starts."""
    from glimmer_ray.cli import ray_session
    from glimmer_ray.data import synthkilt
    from glimmer_ray.data.reading import ReadingConfig, save_reading
    from glimmer_ray.memory.build import build_memory
    from glimmer_ray.retrieval.index import IndexConfig

    root = tmp_path_factory.mktemp("serve")
    reading = ReadingConfig(
        question_tokens=24, passage_tokens=40, answer_tokens=6, num_passages=4, tasks=synthkilt.TASKS
    )
    prepare = load_job("prepare_data")
    with ray_session():
        prepare.main(
            prepare.PrepareConfig(
                output_dir=str(root),
                scale="tiny",
                num_passages=4,
                recall_ks=[4],
                tokenizer_vocab_size=600,
                index=IndexConfig(use_gpu=False),
            )
        )
        model = _tiny_reader(root / "model", str(root / "tokenizer"), seed=0)
        other_model = _tiny_reader(root / "other_model", str(root / "tokenizer"), seed=1)
        for directory in (model, other_model):
            save_reading(directory, reading)
        build_memory(
            str(root / "passages.parquet"),
            str(root / "memory"),
            model,
            str(root / "tokenizer"),
            reading.passage_tokens,
            progress=False,
        )
    args = {
        "model_dir": model,
        "index_dir": str(root / "index"),
        "passages": str(root / "passages.parquet"),
        "memory_store": str(root / "memory"),
        "max_top_k": 8,
    }
    return {"root": root, "model": model, "other_model": other_model, "reading": reading, "args": args}
