"""Shared fixtures: tiny random T5.1.1 checkpoints saved in Hugging Face layout."""

from __future__ import annotations

import os

import pytest
import torch

from glimmer_ray.model.random_t5 import save_random_t5, t5_1_1_config

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
