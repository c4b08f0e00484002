"""The DeepSpeed config of the training job: ZeRO stage 1/2/3, optimiser and parameter offload, precision,
AdamW (DeepSpeed's own) or Adafactor (a client optimizer), and the warm-up schedule."""

from __future__ import annotations

import glob
import os
import time
from typing import Any

import torch

# ZeRO-3: the optimiser steps a rank's flat fp32 partition this many elements at a time, which bounds its temporaries
# (an unfactored Adafactor makes two of the step's size); DeepSpeed's default, 1e9 elements, makes them 8 GB in fp32; 2e7 keeps them under 200 MB.
ZERO3_SUB_GROUP_SIZE = 20_000_000
# ZeRO-3: gathered parameter elements a rank keeps alive between uses (DeepSpeed's default for both
# stage3_max_live_parameters and stage3_max_reuse_distance): a model below it is held whole on every rank from forward
# to backward; lower it to trade re-gathering for memory.
ZERO3_LIVE_PARAMETERS = 1_000_000_000
# DeepSpeed builds its C++ ops (on CPU: the shared-memory all-reduce) with torch's JIT extension loader, which guards
# a build with a `lock` file in the op's folder and waits while it exists; a build killed midway leaves the file, and
# every later build of that op then waits forever. A folder where nothing changed for this long holds no build.
STALE_BUILD_SECONDS = 600


def extensions_root() -> str:
    """The folder torch's JIT extension loader builds ops in (TORCH_EXTENSIONS_DIR, else its per-user cache)."""
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def check_extension_locks(root: str | None = None, stale_seconds: float = STALE_BUILD_SECONDS) -> None:
    """Refuse to start DeepSpeed when an op's build lock under `root` (default `extensions_root()`) was left by a
    killed build: no file in its folder changed for `stale_seconds`. DeepSpeed would wait on it forever."""
    root = root or extensions_root()
    now, stale = time.time(), []
    for lock in glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock")):
        folder = os.path.dirname(lock)
        try:
            changed = max(os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder))
        except (FileNotFoundError, ValueError):  # the build finished (and removed its lock) meanwhile
            continue
        if now - changed > stale_seconds:
            stale.append(lock)
    if stale:
        raise RuntimeError(
            f"{', '.join(stale)}: a build of DeepSpeed's ops was killed and left its lock (nothing in the folder changed "
            f"for {stale_seconds / 60:.0f} minutes); DeepSpeed would wait on it forever. Remove it (rm {' '.join(stale)}) "
            "and start again."
        )


def deepspeed_config(
    micro_batch_size: int,
    gradient_accumulation_steps: int = 1,
    zero_stage: int = 2,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    bf16: bool = False,
    optimizer: str = "adamw",
    learning_rate: float = 1e-4,
    weight_decay: float = 0.0,
    gradient_clipping: float = 1.0,
    warmup_steps: int = 0,
    hidden_size: int | None = None,
    live_parameters: int = ZERO3_LIVE_PARAMETERS,
) -> dict[str, Any]:
    """A DeepSpeed config. AdamW is DeepSpeed's own (`torch_adam`: no fused kernel to compile on CPU);
    Adafactor is passed as a client optimizer by the training job, so no `optimizer` section then.

    With ZeRO-3 and the model's `hidden_size` d, the buckets follow the model as Hugging Face's DeepSpeed integration
    sizes them ("auto"): gradients reduced d^2 elements at a time, parameters prefetched 0.9 d^2 at a time, and only
    parameters under 10 d elements (layer norms) kept whole on every rank. DeepSpeed's fixed defaults (a 5e8-element
    reduce bucket: 2 GB of fp32 per rank) would dwarf a partition of a model under a few billion parameters."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if offload_parameters and zero_stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer and zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["sub_group_size"] = ZERO3_SUB_GROUP_SIZE
        zero["stage3_max_live_parameters"] = live_parameters
        zero["stage3_max_reuse_distance"] = live_parameters
        if hidden_size is not None:
            zero["reduce_bucket_size"] = hidden_size * hidden_size
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if warmup_steps > 0:  # DeepSpeed's own schedule: linear from 0 to learning_rate, then constant
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": learning_rate,
                "warmup_num_steps": warmup_steps,
                "warmup_type": "linear",
            },
        }
    if optimizer == "adamw":
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": learning_rate, "weight_decay": weight_decay, "torch_adam": True},
        }
    elif optimizer == "adafactor":
        config["zero_allow_untested_optimizer"] = True  # a client optimizer: ZeRO shards its states like any other
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'adafactor', got {optimizer!r}")
    if offload_optimizer and optimizer == "adamw":
        config["optimizer"]["params"]["torch_adam"] = False  # DeepSpeedCPUAdam serves offloaded states
    return config
