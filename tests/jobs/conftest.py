"""The tiny quickstart, run once per test session: its artifacts (prepared data, index, pre-trained T5,
trained reader with its reading.json, memory store, metrics) are the inputs of the other jobs' tests."""

from __future__ import annotations

import pytest

FAST_TRAINING = [
    "optim.max_steps=4",
    "checkpoint.every_steps=4",
    "log.every_steps=2",
    "data.dev_limit_per_task=4",
    "scaling.num_workers=1",
    "deepspeed.enabled=false",
    "data.num_passages=4",
    "model.num_selected=2",
    "data.cache=false",
]  # materialising the stream costs more than these 4 steps; tests/jobs/test_train.py covers it
FAST_PRETRAINING = ["steps=6", "d_model=32", "batch_size=4", "num_cpus=1", "log_every_steps=3"]


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory, load_job):
    """(config, summary, root) of one tiny quickstart on its own local Ray cluster, two questions served."""
    quickstart = load_job("quickstart")
    root = tmp_path_factory.mktemp("quickstart") / "qs"
    config = quickstart.QuickstartConfig(
        output_dir=str(root),
        scale="tiny",
        train_overrides=FAST_TRAINING,
        pretrain_overrides=FAST_PRETRAINING,
        questions=2,
        port=8437,
    )
    return config, quickstart.main(config), root
