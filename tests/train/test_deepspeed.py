"""The DeepSpeed config: ZeRO sections, offload, precision, optimiser."""

from __future__ import annotations

import pytest

from glimmer_ray.train.deepspeed import deepspeed_config


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
