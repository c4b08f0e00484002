"""ZeRO-3 without whole copies: a GLIMMER reader built partitioned, filled from a checkpoint slice by slice, and
exported one gathered parameter at a time.

    build_partitioned   the model constructed under `deepspeed.zero.Init` (each rank keeps only its partition),
                        then every tensor of every checkpoint file read in turn, each rank reading only the bytes
                        of its own partition straight into it (no memory map, no copy of the rows around it), so
                        no rank ever holds a whole model, a whole tensor or a file's pages
    gathered_parameters every parameter gathered in turn and handed to rank 0 as an fp32 CPU copy: the export
    save_sharded        Hugging Face's sharded safetensors layout (`model-0000i-of-0000n.safetensors` and
                        `model.safetensors.index.json`, at most `max_shard_size` a file) from such a stream

DeepSpeed's ZeRO-3 layout (`deepspeed.runtime.zero.partition_parameters`): a parameter of n elements is flattened
and padded to a multiple of the world size w; rank r holds elements [r p, (r + 1) p) as `param.ds_tensor`, p = ceil(n / w).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoConfig
from transformers.initialization import no_init_weights
from transformers.utils.hub import convert_file_size_to_int

from glimmer_ray.model import GlimmerConfig, GlimmerForConditionalGeneration
from glimmer_ray.model.modeling import glimmer_config_from_t5

SAFETENSORS_INDEX = "model.safetensors.index.json"
IGNORED_KEYS = ("EncDecAttention.relative_attention_bias",)  # T5 stores it; only self-attention of block 0 uses one
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are ZeRO-3 partitions (built under `deepspeed.zero.Init`)."""
    return any(hasattr(param, "ds_id") for param in model.parameters())


def checkpoint_files(directory: str) -> list[str]:
    """The safetensors files of a Hugging Face checkpoint directory: the shards its index names, or its one file."""
    index = os.path.join(directory, SAFETENSORS_INDEX)
    if os.path.exists(index):
        with open(index) as handle:
            names = sorted(set(json.load(handle)["weight_map"].values()))
        return [os.path.join(directory, name) for name in names]
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(
        f"{directory} holds no safetensors weights (model.safetensors or {SAFETENSORS_INDEX}); ZeRO-3 reads "
        "checkpoints slice by slice from safetensors: convert a pytorch_model.bin once with "
        "`T5ForConditionalGeneration.from_pretrained(dir).save_pretrained(dir, max_shard_size='2GB')`"
    )


def partitioned_config(checkpoint: str, options: dict[str, Any]) -> tuple[GlimmerConfig, bool]:
    """The GLIMMER config of a T5 or GLIMMER checkpoint with `options` applied, and whether it is a T5 one."""
    saved = AutoConfig.from_pretrained(checkpoint)
    if saved.model_type == GlimmerConfig.model_type:
        return GlimmerConfig.from_pretrained(checkpoint, **options), False
    if saved.model_type != "t5":
        raise ValueError(
            f"{checkpoint} holds a {saved.model_type!r} checkpoint; GLIMMER is built from a T5 (T5.1.1) or GLIMMER one"
        )
    return glimmer_config_from_t5(saved, options), True


def build_partitioned(checkpoint: str, ds_config: dict[str, Any], **options) -> GlimmerForConditionalGeneration:
    """GLIMMER from a T5 or GLIMMER checkpoint under ZeRO-3: constructed under `deepspeed.zero.Init(ds_config)`
    and filled with each rank's own slices of the checkpoint's tensors (the same weights `from_t5` /
    `from_pretrained` give, partitioned). A T5 checkpoint's memory blocks also fill a separate question encoder;
    the scoring head is initialised on rank 0 and partitioned. Every rank must call it."""
    import deepspeed
    import torch.distributed as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    config, from_t5 = partitioned_config(checkpoint, options)
    # no initialisation: every weight but the new scoring head's comes from the checkpoint (under zero.Init each
    # module's initialiser would gather, initialise and broadcast its parameters), and no broadcast of the
    # uninitialised tensors either
    with no_init_weights(), _partition_only(deepspeed)(config_dict_or_path=ds_config):
        model = GlimmerForConditionalGeneration(config)
    model.tie_weights()  # part of the initialisation skipped above
    parameters = dict(model.named_parameters())
    filled: set[str] = set()
    for path in checkpoint_files(checkpoint):
        tensors, data_start = safetensors_header(path)
        with open(path, "rb", buffering=0) as handle:
            for key, entry in tensors.items():
                if any(ignored in key for ignored in IGNORED_KEYS):
                    continue
                targets = [key] if key in parameters else []
                if from_t5 and config.separate_question_encoder and key.startswith("encoder.block."):
                    index, rest = key[len("encoder.block.") :].split(".", 1)
                    if int(index) < config.num_memory_layers:
                        targets.append(f"question_encoder.{index}.{rest}")
                if not targets and key in model._tied_weights_keys:
                    continue  # tied to shared.weight, which the checkpoint also holds
                if not targets:
                    raise ValueError(f"{path} holds {key}, which the GLIMMER model of {checkpoint} does not have")
                for name in targets:
                    _fill_partition(parameters[name], handle, data_start, entry, f"{path}: {key}", rank, world_size)
                    filled.add(name)
    fresh = [name for name in parameters if name not in filled]
    expected_fresh = ("rerank_head.",) if not from_t5 else ("rerank_head.", "question_encoder.")
    missing = [name for name in fresh if not name.startswith(expected_fresh)]
    if missing:
        raise ValueError(f"checkpoint {checkpoint} does not fit the GLIMMER layout: missing {sorted(missing)}")
    head = [parameters[name] for name in fresh]
    if head:  # a new scoring head: GLIMMER's initialisation on rank 0, then partitioned
        with deepspeed.zero.GatheredParameters(head, modifier_rank=0), torch.no_grad():
            if rank == 0:
                model._init_weights(model.rerank_head)
    return model


def safetensors_header(path: str) -> tuple[dict[str, dict], int]:
    """A safetensors file's tensors (name -> dtype, shape, data_offsets) and the byte where their data starts.
    The format: an 8-byte little-endian header length n, n bytes of JSON header, then the data."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        raw = handle.read(length) if length > 0 else b""
    if length <= 0 or len(raw) != length:
        raise ValueError(f"{path} is not a safetensors file (its header is cut short or missing)")
    header = json.loads(raw)
    header.pop("__metadata__", None)
    return header, 8 + length


def _partition_only(deepspeed) -> type:
    """`deepspeed.zero.Init` that partitions each new parameter without first broadcasting it whole from rank 0
    (partition_parameters.py `_zero_init_param`): the broadcast makes every other rank write a full copy of each
    module's parameters (the 126 MiB embedding of T5-large) only to overwrite its share from the checkpoint."""

    class PartitionOnly(deepspeed.zero.Init):
        def _zero_init_param(self, param: torch.nn.Parameter) -> None:
            self._convert_to_deepspeed_param(param)
            param.partition()

    return PartitionOnly


def _fill_partition(
    param: torch.nn.Parameter, handle, data_start: int, entry: dict, key: str, rank: int, world_size: int
) -> None:
    """Read this rank's elements of the checkpoint tensor `entry` (a safetensors header entry of the file open as
    `handle`) into the ZeRO-3 partition `param.ds_tensor`: straight into it when it is a CPU tensor of the file's
    dtype, else through a buffer of just those elements (then cast and moved)."""
    shape = tuple(entry["shape"])
    if shape != tuple(param.ds_shape):
        raise ValueError(f"{key}: the checkpoint holds {list(shape)}, the model {list(param.ds_shape)}")
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"{key}: dtype {entry['dtype']} is not a floating-point type a reader's weights can take")
    numel, size = param.ds_numel, param.ds_tensor.numel()
    if size * world_size < numel:
        raise RuntimeError(f"{key}: a partition of {size} elements x {world_size} ranks does not cover {numel}")
    begin, finish = entry["data_offsets"]
    width = torch.tensor([], dtype=dtype).element_size()
    if finish - begin != numel * width:
        raise ValueError(f"{key}: {finish - begin} bytes of data for {numel} elements of {entry['dtype']}")
    start, end = min(rank * size, numel), min((rank + 1) * size, numel)
    with torch.no_grad():
        target = param.ds_tensor.detach()[: end - start]  # [end - start], this rank's elements
        direct = target.device.type == "cpu" and target.dtype == dtype
        buffer = target if direct else torch.empty(end - start, dtype=dtype)
        _read_into(handle, data_start + begin + start * width, buffer.view(torch.uint8).numpy(), key)
        if not direct:
            target.copy_(buffer)
        param.ds_tensor.detach()[end - start :].zero_()  # the last rank's padding: flat optimiser states read it


def _read_into(handle, offset: int, out, key: str) -> None:
    """Fill the byte array `out` from `handle` at `offset` (reads may come back short: read until full)."""
    view, done = memoryview(out), 0
    handle.seek(offset)
    while done < len(view):
        count = handle.readinto(view[done:])
        if not count:
            raise ValueError(f"{key}: the file ends {len(view) - done} bytes before this tensor's data does")
        done += count


def gathered_parameters(model: torch.nn.Module, rank: int) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Each parameter of a ZeRO-3 model gathered in turn: rank 0 gets an fp32 CPU copy, the others None. Every rank
    must consume the whole stream (each gather is collective)."""
    import deepspeed

    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            tensor = param.detach().to("cpu", torch.float32, copy=True) if rank == 0 else None
        yield name, tensor


def save_sharded(
    tensors: Iterable[tuple[str, torch.Tensor | None]], target: str, max_shard_size: int | str = "2GB"
) -> list[str]:
    """Write `tensors` as Hugging Face's sharded safetensors checkpoint in `target` (one `model.safetensors` when it
    all fits one shard), holding at most one shard in memory. None tensors are skipped (other ranks' share of a
    gathered stream). Returns the files written."""
    limit = convert_file_size_to_int(max_shard_size)
    if limit <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    os.makedirs(target, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0
    parts: list[tuple[str, list[str]]] = []  # temporary file, its tensor names

    def flush() -> None:
        path = os.path.join(target, f".part-{len(parts):05d}.safetensors")
        save_file(shard, path, metadata={"format": "pt"})
        parts.append((path, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        if tensor is None:
            continue
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > limit:
            flush()
            shard_bytes = 0
        shard[name] = tensor.contiguous()
        shard_bytes += size
        total += size
    if shard or not parts:
        flush()
    for stale in os.listdir(target):  # an earlier export's weights in the same directory
        if stale in (SAFETENSORS_INDEX, "model.safetensors") or re.fullmatch(r"model-\d+-of-\d+\.safetensors", stale):
            os.remove(os.path.join(target, stale))
    if len(parts) == 1:
        final = os.path.join(target, "model.safetensors")
        os.replace(parts[0][0], final)
        return [final]
    files, weight_map = [], {}
    for number, (path, names) in enumerate(parts, start=1):
        name = f"model-{number:05d}-of-{len(parts):05d}.safetensors"
        os.replace(path, os.path.join(target, name))
        files.append(os.path.join(target, name))
        weight_map.update({key: name for key in names})
    with open(os.path.join(target, SAFETENSORS_INDEX), "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2, sort_keys=True)
    return files
