"""The serving stages run the reader at the dtype and on the device a deployment asks for: bf16 agrees with fp32
within bf16's precision, memory of the saved weights is accepted at any dtype, and a GPU asked for where there is
none, or an unknown dtype, is a clear error (in the stages and in the Serve app's args)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from glimmer_ray.memory.store import memory_encoder_fingerprint
from glimmer_ray.model import GlimmerForConditionalGeneration
from glimmer_ray.runtime import torch_device, torch_dtype
from glimmer_ray.serving import ReaderStages
from serve_app.app import AppArgs, stage_options

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")


@pytest.fixture(scope="module")
def reader_dir(tiny_t5_dir, tmp_path_factory) -> str:
    model = GlimmerForConditionalGeneration.from_t5(tiny_t5_dir, live_proportion=0.5, num_selected=2)
    with torch.no_grad():
        model.rerank_head.proj.weight.normal_()  # a head that ranks, not the init
    path = tmp_path_factory.mktemp("reader")
    model.save_pretrained(path)
    return str(path)


def _requests(model, num_requests=3, num_passages=4, passage_tokens=7) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 256, (num_requests * num_passages, passage_tokens), generator=generator)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        memory = model.encode_memory(ids, mask).reshape(num_requests, num_passages, passage_tokens, -1)
    return [
        {
            "question_ids": torch.randint(2, 256, (5 + i,), generator=generator).numpy(),
            "memory": memory[i].numpy(),  # float32, as a store of any codec decodes
            "memory_mask": mask.reshape(num_requests, num_passages, -1)[i].numpy(),
            "num_selected": 2,
            "retrieval_scores": np.zeros(num_passages, dtype=np.float32),
        }
        for i in range(num_requests)
    ]


def test_bfloat16_stages_agree_with_float32(reader_dir):
    fp32 = ReaderStages(reader_dir)
    bf16 = ReaderStages(reader_dir, dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    # the store check reads the saved weights' fingerprint: memory built in fp32 is accepted by a bf16 reader
    assert bf16.memory_encoder_fingerprint == fp32.memory_encoder_fingerprint == memory_encoder_fingerprint(fp32.model)
    requests = _requests(fp32.model)
    expected, actual = fp32.live(requests), bf16.live(requests)
    for want, got in zip(expected, actual):
        assert got["hidden"].dtype == np.float32 and got["hidden"].shape == want["hidden"].shape
        scale = np.abs(want["hidden"]).max()
        assert np.abs(got["hidden"] - want["hidden"]).max() <= 0.05 * scale  # bf16 keeps 8 bits of mantissa
        assert np.abs(got["scores"] - want["scores"]).max() <= 0.05 * np.abs(want["scores"]).max() + 1e-3
        np.testing.assert_array_equal(got["mask"], want["mask"])
    assert not np.array_equal(actual[0]["hidden"], expected[0]["hidden"])  # it did compute in bf16
    decode = [{"hidden": r["hidden"], "mask": r["mask"], "max_new_tokens": 4} for r in expected]
    assert [len(a) <= 4 for a in bf16.decode(decode)] == [True] * len(decode)


@NO_GPU
def test_a_gpu_where_there_is_none_is_a_clear_error(reader_dir):
    with pytest.raises(ValueError, match="needs a CUDA GPU.*use device=cpu"):
        ReaderStages(reader_dir, device="cuda")
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
        torch_device("tpu")
    assert torch_device(None) == torch.device("cpu")


def test_an_unknown_dtype_is_a_clear_error(reader_dir):
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        ReaderStages(reader_dir, dtype="int4")
    assert torch_dtype("float16") == torch.float16


def test_app_args_check_device_dtype_and_gpu_resources():
    with pytest.raises(ValidationError, match="dtype must be one of"):
        AppArgs(dtype="fp8")
    with pytest.raises(ValidationError, match="device must be cpu, cuda or cuda:N"):
        AppArgs(device="gpu")
    # cuda model stages must reserve a GPU, or Serve would place them on CPU-only nodes
    with pytest.raises(ValueError, match="LiveEncoderReranker and Decoder reserve none"):
        stage_options(AppArgs(device="cuda"))
    gpu = {"ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}
    args = AppArgs(device="cuda", dtype="bfloat16", deployments={"LiveEncoderReranker": gpu, "Decoder": gpu})
    assert stage_options(args)["Decoder"]["ray_actor_options"]["num_gpus"] == 1
