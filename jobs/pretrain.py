"""Pre-train a T5.1.1 on the knowledge source's passages (text infilling), for machines without a checkpoint.

    python jobs/pretrain.py --config jobs/configs/pretrain_quickstart.yaml
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain_quickstart.yaml

GLIMMER starts from a pre-trained T5; with a real one (`model.checkpoint` of the training job) skip this
job. Setup: passages of `jobs/prepare_data.py`'s output, tokenised with its tokenizer; a random T5.1.1 of
the configured shape. Loop (one Ray task, `num_cpus` threads or one GPU): corrupted passage -> whole
passage (`glimmer_ray.train.pretrain`), AdamW with linear warm-up. Cleanup: the model in Hugging Face
layout (safetensors) with the tokenizer in `output_dir`, written under a temporary name and renamed when
complete; an existing `output_dir` is reused unless overwrite=true. Point the training recipe's
`model.checkpoint` at it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import ray

from glimmer_ray.config import parse_job_args, to_dict
from glimmer_ray.train.pretrain import pretrain_t5


@dataclass
class PretrainConfig:
    data_dir: str = "outputs/quickstart"  # jobs/prepare_data.py output (passages.parquet, tokenizer/)
    output_dir: str = "outputs/quickstart/t5-pretrained"  # Hugging Face T5 checkpoint written here
    tokenizer_dir: str | None = (
        None  # null = data_dir/tokenizer; pre-training on another corpus: the fine-tuning data's tokenizer
    )
    d_model: int = 64  # width d
    num_layers: int = 6  # L, encoder and decoder each
    num_heads: int = 4  # attention heads
    d_ff: int | None = None  # gated FFN width; null = 8 d / 3
    dropout_rate: float = 0.0  # dropout while pre-training, kept in the checkpoint's config for fine-tuning
    max_tokens: int = 96  # passage tokens read (longer passages are cut)
    noise_density: float = 0.15  # share of tokens in corrupted spans
    mean_span_length: float = 3.0  # tokens per span, on average
    steps: int = 600  # optimiser steps
    batch_size: int = 32  # passages per step
    learning_rate: float = 0.003  # AdamW peak
    warmup_steps: int = 100  # linear warm-up
    weight_decay: float = 0.01  # AdamW
    num_cpus: int = 2  # CPUs of the Ray task (torch threads)
    use_gpu: bool = False  # one GPU for the task
    log_every_steps: int = 50  # progress lines
    seed: int = 0
    overwrite: bool = False  # redo an existing output_dir
    ray_address: str | None = None  # null: the cluster of `ray job submit`, else a new local one


def main(config: PretrainConfig) -> dict:
    # setup
    config.data_dir, config.output_dir = os.path.abspath(config.data_dir), os.path.abspath(config.output_dir)
    config.tokenizer_dir = os.path.abspath(config.tokenizer_dir or os.path.join(config.data_dir, "tokenizer"))
    for needed in (os.path.join(config.data_dir, "passages.parquet"), config.tokenizer_dir):
        if not os.path.exists(needed):
            raise SystemExit(f"{needed} is missing: run jobs/prepare_data.py first")
    if os.path.exists(os.path.join(config.output_dir, "pretrain.json")) and not config.overwrite:
        print(f"[pretrain] reusing {config.output_dir}")
        with open(os.path.join(config.output_dir, "pretrain.json")) as handle:
            return json.load(handle)
    started_ray = not ray.is_initialized()
    ray.init(address=config.ray_address, ignore_reinit_error=True, log_to_driver=True)

    # loop (a Ray task on a worker with the CPUs or GPU asked for)
    settings = {key: value for key, value in to_dict(config).items() if key not in ("overwrite", "ray_address")}
    task = ray.remote(num_cpus=config.num_cpus, num_gpus=1 if config.use_gpu else 0)(pretrain_t5)
    summary = ray.get(task.remote(**settings))
    print(
        f"[pretrain] {summary['steps']} steps on {summary['passages']} passages in {summary['seconds']:.0f} s: "
        f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}; wrote {config.output_dir}"
    )

    # cleanup
    if started_ray:
        ray.shutdown()
    return summary


if __name__ == "__main__":
    main(parse_job_args(PretrainConfig, __doc__.splitlines()[0], sys.argv[1:]))
