"""ZeRO-3 construction and export: a checkpoint loaded partitioned on 2 Ray Train workers (real DeepSpeed, gloo)
holds bit for bit the weights `from_t5` / `from_pretrained` give, and the export gathered one parameter at a time
reloads as the same model, sharded at the configured size."""

from __future__ import annotations

import json
import os

import pytest
import ray.train
import torch
from ray.train.torch import TorchTrainer

from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.model.random_t5 import random_t5, t5_1_1_config
from glimmer_ray.train.deepspeed import deepspeed_config
from glimmer_ray.train.zero3 import SAFETENSORS_INDEX, checkpoint_files, save_sharded

pytestmark = pytest.mark.ray

OPTIONS = dict(live_proportion=0.5, rerank_proportion=0.5, num_selected=2, separate_question_encoder=True)


def _load_and_export(loop_config: dict) -> None:
    """On each worker: build partitioned, report this rank's partition sizes, export gathered and sharded."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    from glimmer_ray.train.zero3 import build_partitioned, gathered_parameters, is_partitioned

    rank = ray.train.get_context().get_world_rank()
    model = build_partitioned(loop_config["checkpoint"], deepspeed_config(1, zero_stage=3), **loop_config["options"])
    held = sum(param.ds_tensor.numel() for param in model.parameters())
    tensors = gathered_parameters(model, rank)
    if rank == 0:
        save_sharded(tensors, loop_config["export"], max_shard_size="20KB")
        model.config.save_pretrained(loop_config["export"])
    else:
        for _ in tensors:
            pass
    with open(os.path.join(loop_config["export"], f"rank{rank}.json"), "w") as handle:
        json.dump({"held": held, "partitioned": is_partitioned(model)}, handle)


def _run(checkpoint: str, export: str, options: dict) -> list[dict]:
    os.makedirs(export, exist_ok=True)
    TrainerResult = TorchTrainer(
        _load_and_export,
        train_loop_config={"checkpoint": checkpoint, "export": export, "options": options},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(storage_path=os.path.join(export, "ray"), name="zero3"),
    ).fit()
    assert TrainerResult.error is None
    return [json.load(open(os.path.join(export, f"rank{rank}.json"))) for rank in (0, 1)]


@pytest.fixture(scope="module")
def sharded_t5(tmp_path_factory) -> tuple[str, torch.nn.Module]:
    t5 = random_t5(t5_1_1_config(vocab_size=96, d_model=32, num_layers=4, num_heads=2), seed=5)
    directory = tmp_path_factory.mktemp("t5")
    t5.save_pretrained(directory, max_shard_size="30KB")  # several shards, as HF writes large models
    assert len(checkpoint_files(str(directory))) > 2
    return str(directory), t5


def test_a_t5_checkpoint_loads_partitioned_with_from_t5s_weights(sharded_t5, tmp_path, ray_cluster):
    checkpoint, _ = sharded_t5
    ranks = _run(checkpoint, str(tmp_path / "export"), OPTIONS)
    reference = GlimmerForConditionalGeneration.from_t5(checkpoint, **OPTIONS)
    total = sum(param.numel() for param in reference.parameters())
    assert all(rank["partitioned"] for rank in ranks)
    assert all(rank["held"] <= total / 2 + 64 * len(list(reference.parameters())) for rank in ranks)  # half, + padding

    exported = GlimmerForConditionalGeneration.from_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / SAFETENSORS_INDEX).exists() and len(checkpoint_files(str(tmp_path / "export"))) > 3
    got, want = exported.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    fresh = [name for name in want if name.startswith("rerank_head.")]
    assert all(torch.equal(got[name], want[name]) for name in want if name not in fresh)  # every T5 weight, bit for bit
    assert all(  # the separate question encoder starts as a copy of the memory layers
        torch.equal(got[name], got[name.replace("question_encoder.", "encoder.block.")])
        for name in want
        if name.startswith("question_encoder.")
    )
    head = got["rerank_head.proj.weight"]  # GLIMMER's initialisation: normal, std d^-0.5
    assert head.abs().sum() > 0 and 0.5 < head.std().item() * 32**0.5 < 2.0


def test_a_glimmer_export_reloads_partitioned_bit_for_bit(sharded_t5, tmp_path, ray_cluster):
    checkpoint, _ = sharded_t5
    source = GlimmerForConditionalGeneration.from_t5(checkpoint, retrieval_prior=True, **OPTIONS)
    with torch.no_grad():
        source.rerank_head.proj.weight.normal_()  # a trained scoring head
    source.save_pretrained(tmp_path / "glimmer", max_shard_size="25KB")
    _run(str(tmp_path / "glimmer"), str(tmp_path / "export"), {**OPTIONS, "num_selected": 3})
    exported = GlimmerForConditionalGeneration.from_pretrained(tmp_path / "export")
    assert exported.config.num_selected == 3  # the options apply over the checkpoint's
    reference = GlimmerForConditionalGeneration.from_pretrained(tmp_path / "glimmer", num_selected=3)
    got, want = exported.state_dict(), reference.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[name], want[name]) for name in want)


def test_save_sharded_keeps_every_tensor_and_replaces_an_earlier_export(tmp_path):
    tensors = {f"layer.{i}.weight": torch.randn(10, 10) for i in range(5)}  # 400 bytes each
    files = save_sharded(tensors.items(), tmp_path, max_shard_size=900)
    assert [os.path.basename(f) for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.load(open(tmp_path / SAFETENSORS_INDEX))
    assert index["metadata"]["total_size"] == 5 * 400 and sorted(index["weight_map"]) == sorted(tensors)
    from safetensors.torch import load_file

    loaded = {name: tensor for path in files for name, tensor in load_file(path).items()}
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())

    files = save_sharded(tensors.items(), tmp_path, max_shard_size="1MB")  # smaller now: one file, no stale shards
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    with pytest.raises(ValueError, match="max_shard_size"):
        save_sharded(tensors.items(), tmp_path, max_shard_size=0)


class _Partition:
    """DeepSpeed's ZeRO-3 bookkeeping of one parameter on one rank (partition_parameters.py): its full shape and
    size, and this rank's flat share `ds_tensor` (ceil(n / w) elements; the last rank's padded)."""

    def __init__(self, shape: tuple[int, ...], world_size: int, dtype: torch.dtype) -> None:
        self.ds_shape, self.ds_numel = torch.Size(shape), int(torch.tensor(shape).prod())
        self.ds_tensor = torch.full((-(-self.ds_numel // world_size),), float("nan"), dtype=dtype)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_each_rank_reads_exactly_its_elements_of_a_checkpoint_tensor(stored, tmp_path):
    """Ranks' partitions read straight from the file concatenate to the stored tensor (fp32 read in place; bf16
    read and widened into fp32 partitions), padding zeroed; a file cut short or a shape that differs is refused."""
    from safetensors.torch import save_file

    from glimmer_ray.train.zero3 import _fill_partition, safetensors_header

    tensors = {"a.weight": torch.randn(7, 5).to(stored), "b.bias": torch.randn(11).to(stored)}
    save_file(tensors, tmp_path / "model.safetensors")
    header, data_start = safetensors_header(str(tmp_path / "model.safetensors"))
    world_size = 3
    for key, tensor in tensors.items():
        parts = [_Partition(tuple(tensor.shape), world_size, torch.float32) for _ in range(world_size)]
        with open(tmp_path / "model.safetensors", "rb", buffering=0) as handle:
            for rank, part in enumerate(parts):
                _fill_partition(part, handle, data_start, header[key], key, rank, world_size)
        flat = torch.cat([part.ds_tensor for part in parts])  # [w * ceil(n / w)]
        assert torch.equal(flat[: tensor.numel()], tensor.float().reshape(-1))
        assert not flat[tensor.numel() :].any()  # the padding is zeroed

    with open(tmp_path / "model.safetensors", "rb", buffering=0) as handle:
        with pytest.raises(ValueError, match=r"the checkpoint holds \[7, 5\], the model \[5, 7\]"):
            _fill_partition(_Partition((5, 7), 2, torch.float32), handle, data_start, header["a.weight"], "a", 0, 2)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    last = max(header, key=lambda key: header[key]["data_offsets"][1])
    with open(tmp_path / "cut.safetensors", "rb", buffering=0) as handle:
        with pytest.raises(ValueError, match="file ends .* bytes before"):
            shape = tuple(header[last]["shape"])
            _fill_partition(_Partition(shape, 1, torch.float32), handle, data_start, header[last], last, 0, 1)
    (tmp_path / "header.safetensors").write_bytes(data[:12])
    with pytest.raises(ValueError, match="not a safetensors file"):
        safetensors_header(str(tmp_path / "header.safetensors"))


def test_a_checkpoint_without_safetensors_is_refused_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors.*save_pretrained"):
        checkpoint_files(str(tmp_path))


def _distil_and_watch_backward(loop_config: dict) -> None:
    """One ZeRO-3 training step with distillation (dropout on: the teacher runs its own pass); reports the most
    parameter elements gathered at once during backward, against the model's total."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from glimmer_ray.train.step_timing import random_batch
    from glimmer_ray.train.zero3 import build_partitioned

    config = deepspeed_config(1, zero_stage=3, optimizer="adamw", hidden_size=32, live_parameters=1)
    model = build_partitioned(loop_config["checkpoint"], config, **loop_config["options"]).train()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    parameters = list(engine.module.parameters())
    most = [0]

    def watch(_) -> None:
        gathered = sum(p.ds_numel for p in parameters if p.ds_status == ZeroParamStatus.AVAILABLE)
        most[0] = max(most[0], gathered)

    for param in parameters:
        param.register_post_accumulate_grad_hook(watch)
    batch = random_batch(2, 4, 8, 12, 4, 96, seed=ray.train.get_context().get_world_rank())
    output = engine(**batch, pdist_weight=1.0)
    engine.backward(output.loss)
    engine.step()
    if ray.train.get_context().get_world_rank() == 0:
        with open(loop_config["out"], "w") as handle:
            json.dump({"most_gathered": most[0], "total": sum(p.ds_numel for p in parameters)}, handle)


def test_a_distillation_step_releases_gathered_parameters_during_backward(sharded_t5, tmp_path, ray_cluster):
    """The teacher's no-grad pass runs before the student's: after it, DeepSpeed would count no pending backward
    for the modules it ran again, and keep every parameter gathered until backward ends (a whole model per rank)."""
    checkpoint, _ = sharded_t5
    result = TorchTrainer(
        _distil_and_watch_backward,
        train_loop_config={
            "checkpoint": checkpoint,
            "options": {**OPTIONS, "separate_question_encoder": False},
            "out": str(tmp_path / "gathered.json"),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path), name="distil"),
    ).fit()
    assert result.error is None
    watched = json.loads((tmp_path / "gathered.json").read_text())
    assert 0 < watched["most_gathered"] < 0.5 * watched["total"]
