"""The DeepSpeed config: ZeRO sections, offload, precision, optimiser."""

from __future__ import annotations

import os
import time

import pytest

from glimmer_ray.train.deepspeed import STALE_BUILD_SECONDS, check_extension_locks, deepspeed_config


def test_deepspeed_config_sections():
    config = deepspeed_config(
        micro_batch_size=4, gradient_accumulation_steps=2, zero_stage=3, offload_optimizer=True, bf16=True
    )
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert (
        config["zero_optimization"]["stage"] == 3
        and config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    )
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["bf16"] == {"enabled": True} and config["optimizer"]["type"] == "AdamW"
    adafactor = deepspeed_config(micro_batch_size=1, optimizer="adafactor")
    assert "optimizer" not in adafactor and adafactor["zero_allow_untested_optimizer"] is True
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(1, zero_stage=4)
    with pytest.raises(ValueError, match="parameter offload needs ZeRO stage 3"):
        deepspeed_config(1, zero_stage=2, offload_parameters=True)
    with pytest.raises(ValueError, match="optimizer"):
        deepspeed_config(1, optimizer="sgd")


def test_a_build_lock_left_by_a_killed_build_is_refused_with_its_path(tmp_path, monkeypatch):
    """torch's JIT loader waits forever on a lock a killed build left; the workers refuse to start on it instead."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "deepspeed_shm_comm"
    folder.mkdir()
    (folder / "build.ninja").write_text("")
    lock = folder / "lock"
    lock.write_text("")
    check_extension_locks()  # a build under way: its folder changed just now
    old = time.time() - STALE_BUILD_SECONDS - 60
    for path in (lock, folder / "build.ninja"):
        os.utime(path, (old, old))
    with pytest.raises(RuntimeError, match=f"rm {lock}"):
        check_extension_locks()
    (tmp_path / "py311_cpu").mkdir()  # torch's default layout: one folder more
    os.replace(folder, tmp_path / "py311_cpu" / "deepspeed_shm_comm")
    with pytest.raises(RuntimeError, match="deepspeed_shm_comm/lock"):
        check_extension_locks()
    (tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock").unlink()
    check_extension_locks()  # a finished build: no lock
