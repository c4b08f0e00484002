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
import shutil
import sys
import time
from dataclasses import dataclass

import ray

from glimmer_ray.config import parse_job_args, to_dict


@dataclass
class PretrainConfig:
    data_dir: str = "outputs/quickstart"  # jobs/prepare_data.py output (passages.parquet, tokenizer/)
    output_dir: str = "outputs/quickstart/t5-pretrained"  # Hugging Face T5 checkpoint written here
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


def pretrain(config: PretrainConfig) -> dict:
    """The pre-training loop; runs inside a Ray task. Returns the summary."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from glimmer_ray.data.stream import passage_text
    from glimmer_ray.model.random_t5 import random_t5, t5_1_1_config
    from glimmer_ray.train.pretrain import DenoisingBatches

    torch.set_num_threads(max(1, config.num_cpus))
    device = torch.device("cuda" if config.use_gpu else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(config.data_dir, "tokenizer"))
    passages = pq.read_table(os.path.join(config.data_dir, "passages.parquet"), columns=["title", "text"]).to_pylist()
    encoded = tokenizer([passage_text(p["title"], p["text"]) for p in passages], add_special_tokens=False)["input_ids"]
    encoded = [ids[: config.max_tokens - 1] for ids in encoded]
    batches = DenoisingBatches(encoded, config.batch_size, first_sentinel=tokenizer.convert_tokens_to_ids("<extra_id_0>"),
                               seed=config.seed, noise_density=config.noise_density, mean_span_length=config.mean_span_length,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    t5_config = t5_1_1_config(vocab_size=len(tokenizer), d_model=config.d_model, num_layers=config.num_layers, num_heads=config.num_heads,
                              d_ff=config.d_ff, dropout_rate=config.dropout_rate)
    model = random_t5(t5_config, seed=config.seed).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, config.warmup_steps)))

    start = window_start = time.perf_counter()
    window_loss, window_tokens, first_loss, loss_value = 0.0, 0, None, float("nan")
    for step in range(1, config.steps + 1):
        batch = {key: value.to(device) for key, value in batches.next().items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        loss_value = loss.item()
        first_loss = loss_value if first_loss is None else first_loss
        window_loss += loss_value
        window_tokens += int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
        if step % config.log_every_steps == 0 or step == config.steps:
            seconds = time.perf_counter() - window_start
            count = config.log_every_steps if step % config.log_every_steps == 0 else step % config.log_every_steps
            print(f"[pretrain] step {step}/{config.steps} loss {window_loss / count:.3f} tokens/s {window_tokens / seconds:.0f} "
                  f"elapsed {time.perf_counter() - start:.0f} s", flush=True)
            window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()

    staging = config.output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.cpu().save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    summary = {"config": to_dict(config), "passages": len(encoded), "steps": config.steps, "first_loss": first_loss,
               "final_loss": loss_value, "seconds": time.perf_counter() - start}
    with open(os.path.join(staging, "pretrain.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    shutil.rmtree(config.output_dir, ignore_errors=True)
    os.replace(staging, config.output_dir)  # complete checkpoints only
    return summary


def main(config: PretrainConfig) -> dict:
    # setup
    config.data_dir, config.output_dir = os.path.abspath(config.data_dir), os.path.abspath(config.output_dir)
    for needed in ("passages.parquet", "tokenizer"):
        if not os.path.exists(os.path.join(config.data_dir, needed)):
            raise SystemExit(f"{os.path.join(config.data_dir, needed)} is missing: run jobs/prepare_data.py first")
    if os.path.exists(os.path.join(config.output_dir, "pretrain.json")) and not config.overwrite:
        print(f"[pretrain] reusing {config.output_dir}")
        with open(os.path.join(config.output_dir, "pretrain.json")) as handle:
            return json.load(handle)
    started_ray = not ray.is_initialized()
    ray.init(address=config.ray_address, ignore_reinit_error=True, log_to_driver=True)

    # loop
    task = ray.remote(num_cpus=config.num_cpus, num_gpus=1 if config.use_gpu else 0)(pretrain)
    summary = ray.get(task.remote(config))
    print(f"[pretrain] {summary['steps']} steps on {summary['passages']} passages in {summary['seconds']:.0f} s: "
          f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}; wrote {config.output_dir}")

    # cleanup
    if started_ray:
        ray.shutdown()
    return summary


if __name__ == "__main__":
    main(parse_job_args(PretrainConfig, __doc__.splitlines()[0], sys.argv[1:]))
