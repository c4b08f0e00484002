"""The Ray Train worker of the training job: DeepSpeed (or plain PyTorch) steps, sharded dev evaluation,
checkpoints on every rank with a barrier before `ray.train.report`, resume, fault injection, export.

Everything comes from the `TrainConfig` passed as `train_loop_config`; no module globals.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

from glimmer_ray.config import from_dict
from glimmer_ray.train.config import TrainConfig, task_paths, tokenize_config


def build_model(config: TrainConfig, vocab_size: int):
    """GLIMMER from a T5 checkpoint, from a GLIMMER checkpoint (a run continued: an earlier export), or from
    a random T5.1.1 of the configured shape (the same on every rank)."""
    from transformers import AutoConfig

    from glimmer_ray.model import GlimmerConfig, GlimmerForConditionalGeneration
    from glimmer_ray.model.random_t5 import random_t5, t5_1_1_config

    section = config.model
    options = dict(
        live_proportion=section.live_proportion,
        rerank_proportion=section.rerank_proportion,
        num_selected=section.num_selected,
        scoring=section.scoring,
        separate_question_encoder=section.separate_question_encoder,
    )
    saved = AutoConfig.from_pretrained(section.checkpoint) if section.checkpoint else None
    if saved is not None and saved.model_type == GlimmerConfig.model_type:
        if saved.separate_question_encoder != section.separate_question_encoder:
            raise ValueError(
                f"{section.checkpoint} was trained with separate_question_encoder={saved.separate_question_encoder}; "
                f"set model.separate_question_encoder to match (a question encoder cannot be added or dropped mid-training)"
            )
        return GlimmerForConditionalGeneration.from_pretrained(
            section.checkpoint, **options
        )  # the split and m as configured now
    if section.checkpoint:
        return GlimmerForConditionalGeneration.from_t5(section.checkpoint, **options)
    t5_config = t5_1_1_config(
        vocab_size=vocab_size,
        d_model=section.d_model,
        num_layers=section.num_layers,
        num_heads=section.num_heads,
        d_ff=section.d_ff,
        dropout_rate=section.dropout_rate,
    )
    return GlimmerForConditionalGeneration.from_t5(random_t5(t5_config, seed=config.seed).train(), **options)


def check_checkpoint_tokenizer(checkpoint: str | None, tokenizer_dir: str) -> None:
    """Refuse a checkpoint saved with another tokenizer than the training data's: its token ids would name
    other words (a pre-training corpus tokenised by its own tokenizer, say). Checkpoints without a saved
    tokenizer (a bare T5 download) are trusted."""
    if not checkpoint or not any(
        os.path.exists(os.path.join(checkpoint, name)) for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        return
    from transformers import AutoTokenizer

    saved, data = (
        AutoTokenizer.from_pretrained(checkpoint).get_vocab(),
        AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab(),
    )
    if saved != data:
        differ = len(set(saved.items()) ^ set(data.items())) // 2
        raise ValueError(
            f"{checkpoint} was saved with another tokenizer than {tokenizer_dir} (about {differ} of {len(data)} token ids "
            f"differ); pre-train with that tokenizer (jobs/pretrain.py tokenizer_dir={tokenizer_dir}) or prepare the data with "
            "the checkpoint's"
        )


def train_loop_per_worker(loop_config: dict) -> None:
    """One training worker: everything comes from `loop_config` (the TrainConfig as a dict)."""
    config = from_dict(TrainConfig, loop_config)
    if not config.scaling.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed  # after DS_ACCELERATOR is set
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer
    from transformers.optimization import Adafactor

    from glimmer_ray.data.batches import model_inputs
    from glimmer_ray.eval.evaluate import dev_batches, predict, score_predictions
    from glimmer_ray.eval.metrics import reranker_recall, retriever_recall
    from glimmer_ray.train.curriculum import curriculum_step
    from glimmer_ray.train.deepspeed import deepspeed_config

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(config.data.dir, "tokenizer"))
    model = (
        build_model(config, vocab_size=len(tokenizer)).to(device).train()
    )  # from_pretrained leaves a model in eval mode: dropout back on
    if config.optim.freeze_memory:
        for block in model.memory_blocks:
            block.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = config.optim

    if config.deepspeed.enabled:
        ds_config = deepspeed_config(
            optim.batch_size,
            optim.gradient_accumulation_steps,
            config.deepspeed.zero_stage,
            config.deepspeed.offload_optimizer,
            config.deepspeed.offload_parameters,
            config.deepspeed.bf16,
            optim.optimizer,
            optim.learning_rate,
            optim.weight_decay,
            optim.gradient_clipping,
            optim.warmup_steps,
        )
        client_optimizer = None
        if optim.optimizer == "adafactor":
            client_optimizer = Adafactor(
                trainable, lr=optim.learning_rate, relative_step=False, scale_parameter=False, warmup_init=False
            )
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=trainable, optimizer=client_optimizer, config=ds_config
        )
        module = engine.module
    else:  # plain PyTorch, one worker: the reference for DeepSpeed's step time
        engine = None
        module = model
        optimizer = (
            Adafactor(trainable, lr=optim.learning_rate, relative_step=False, scale_parameter=False, warmup_init=False)
            if optim.optimizer == "adafactor"
            else torch.optim.AdamW(trainable, lr=optim.learning_rate, weight_decay=optim.weight_decay)
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda done: min(1.0, (done + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0
        )

    step = 0
    first_loss = None  # the first loss this attempt saw, reported beside the running one
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            if engine is not None:
                _, client_state = engine.load_checkpoint(directory, tag="deepspeed")
            else:
                state = torch.load(os.path.join(directory, "torch_state.pt"), map_location=device)
                module.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                schedule.load_state_dict(state["schedule"])
                client_state = state["client"]
            step = int(client_state["step"])
        if rank == 0:
            print(f"[train] resumed from the checkpoint of step {step}", flush=True)

    writer = None
    run_dir = os.path.join(os.path.abspath(config.checkpoint.storage_path), config.checkpoint.name)
    if rank == 0 and config.log.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    shard = ray.train.get_dataset_shard("train")
    dev_paths = task_paths(config, "dev")
    dev_tokenize = dataclasses.replace(
        tokenize_config(config), evidence_passages=0
    )  # dev reads what was retrieved only
    zero3 = engine is not None and config.deepspeed.zero_stage == 3
    resumed_from = step
    skip = step * optim.gradient_accumulation_steps  # micro-batches already consumed: the data position
    recall_keys = ("reranker_recall", "retriever_recall", "reranker_passage_recall", "retriever_passage_recall")
    teacher_keys = (
        "teacher_passage_recall",
        "pdist_target_max_prob",
    )  # the distillation target: its top m, its sharpness
    window = {
        "loss": 0.0,
        "lm_loss": 0.0,
        "pdist_loss": 0.0,
        "tokens": 0,
        **dict.fromkeys(recall_keys + teacher_keys, 0.0),
        "batches": 0,
        "ranked_batches": 0,
        "distilled_batches": 0,
    }
    window_start = time.perf_counter()
    micro_step = 0
    since_report = {"loss": 0.0, "batches": 0, "tokens": 0, "start": time.perf_counter()}
    started = False  # the clocks start at the first batch: the stream's and DeepSpeed's start-up are not step time
    while step < optim.max_steps:
        for batch in shard.iter_batches(batch_size=optim.batch_size, batch_format="numpy", drop_last=True):
            if skip > 0:
                skip -= 1
                continue
            if not started:
                started = True
                window_start = since_report["start"] = time.perf_counter()
            if config.failure.fail_at_step == step and rank == config.failure.fail_rank:
                marker = os.path.join(run_dir, ".fault_injected")
                if not os.path.exists(marker):
                    os.makedirs(run_dir, exist_ok=True)
                    open(marker, "w").close()
                    print(f"[train] fault injection: rank {rank} exits at step {step}", flush=True)
                    # Ray Train registers reports at its health checks (every 2 s): wait past one, so the
                    # test knows which checkpoint must be resumed. (A real crash within 2 s of a report can
                    # lose that report; the group then resumes from the checkpoint before it.)
                    time.sleep(5)
                    os._exit(1)
            inputs = model_inputs(
                batch, device, closed_book=config.model.closed_book, eos_token_id=tokenizer.eos_token_id
            )
            inputs, arguments, reader_warmup = curriculum_step(
                inputs, step, optim, closed_book=config.model.closed_book
            )
            output = (engine or module)(**inputs, **arguments)
            if engine is not None:
                engine.backward(output.loss)
                engine.step()
            else:
                (output.loss / optim.gradient_accumulation_steps).backward()
            micro_step += 1
            if first_loss is None:
                first_loss = output.loss.item()
            since_report["loss"] += output.loss.item()
            since_report["batches"] += 1
            window["loss"] += output.loss.item()
            window["lm_loss"] += output.lm_loss.item()
            window["pdist_loss"] += output.pdist_loss.item() if output.pdist_loss is not None else 0.0
            tokens = int(
                inputs["question_mask"].sum() + inputs["passage_mask"].sum() + (inputs["labels"] != -100).sum()
            )
            window["tokens"] += tokens
            since_report["tokens"] += tokens
            if (
                output.rerank_scores is not None and not reader_warmup and not config.model.closed_book
            ):  # closed book ranks nothing
                m = output.selected.shape[1]
                reranked = torch.topk(
                    output.rerank_scores.detach(), m, dim=1
                ).indices.cpu()  # the reranker's top m, even while warming up
                window["reranker_recall"] += reranker_recall(reranked, batch["passage_pages"], batch["gold_pages"])
                window["retriever_recall"] += retriever_recall(m, batch["passage_pages"], batch["gold_pages"])
                window["reranker_passage_recall"] += reranker_recall(
                    reranked, batch["passage_keys"], batch["gold_passages"], level="passage"
                )
                window["retriever_passage_recall"] += retriever_recall(
                    m, batch["passage_keys"], batch["gold_passages"], level="passage"
                )
                window["ranked_batches"] += 1
            if output.pdist_target is not None:
                teacher = torch.topk(output.pdist_target, output.selected.shape[1], dim=1).indices.cpu()  # [b, m]
                window["teacher_passage_recall"] += reranker_recall(
                    teacher, batch["passage_keys"], batch["gold_passages"], level="passage"
                )
                window["pdist_target_max_prob"] += (
                    torch.softmax(output.pdist_target / optim.pdist_temperature, dim=1).max(1).values.mean().item()
                )
                window["distilled_batches"] += 1
            window["batches"] += 1
            if micro_step % optim.gradient_accumulation_steps:
                continue
            if engine is None:
                torch.nn.utils.clip_grad_norm_(trainable, optim.gradient_clipping)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
            step += 1

            if step % config.log.every_steps == 0 and rank == 0:
                seconds = time.perf_counter() - window_start
                metrics = {key: window[key] / window["batches"] for key in ("loss", "lm_loss", "pdist_loss")}
                if window["ranked_batches"]:  # none during the reader warm-up: nothing is ranked
                    metrics.update({key: window[key] / window["ranked_batches"] for key in recall_keys})
                if window["distilled_batches"]:  # a target whose largest probability is near 1/k teaches no ranking
                    metrics.update({key: window[key] / window["distilled_batches"] for key in teacher_keys})
                metrics["tokens_per_second_per_worker"] = window["tokens"] / seconds
                metrics["seconds_per_step"] = seconds / (window["batches"] / optim.gradient_accumulation_steps)
                print(
                    f"[train] step {step}/{optim.max_steps} " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                    flush=True,
                )
                if writer:
                    for key, value in metrics.items():
                        writer.add_scalar(f"train/{key}", value, step)
            if step % config.log.every_steps == 0:
                window = dict.fromkeys(window, 0)
                window_start = time.perf_counter()

            if step % config.checkpoint.every_steps == 0 or step == optim.max_steps:
                train_seconds = (
                    time.perf_counter() - since_report["start"]
                )  # training only: evaluation and saving come after
                shard_batches = dev_batches(
                    dev_paths,
                    os.path.join(config.data.dir, "tokenizer"),
                    dev_tokenize,
                    batch_size=optim.batch_size,
                    limit_per_task=config.data.dev_limit_per_task,
                    shard=(rank, world_size),
                )
                predictions = predict(
                    module if engine is None else engine.module,
                    shard_batches,
                    tokenizer,
                    max_new_tokens=config.data.answer_tokens,
                    closed_book=config.model.closed_book,
                    fixed_length=zero3,
                    device=device,
                )
                if world_size > 1:
                    gathered = [None] * world_size
                    dist.all_gather_object(gathered, predictions)
                    predictions = [p for part in gathered for p in part]
                scores = score_predictions(predictions)
                report = {
                    "step": step,
                    "resumed_from_step": resumed_from,
                    "first_loss": first_loss,
                    "train_loss": since_report["loss"] / max(1, since_report["batches"]),
                    "seconds_per_step": train_seconds
                    / max(1, since_report["batches"] // optim.gradient_accumulation_steps),
                    "tokens_per_second_per_worker": since_report["tokens"] / train_seconds,
                    "dev_em": scores["average"]["em"],
                    "dev_f1": scores["average"]["f1"],
                    "dev_kilt_em": scores["average"]["kilt_em"],
                    **{f"dev_em/{task}": value["em"] for task, value in scores.items() if task != "average"},
                }
                if rank == 0:
                    print(
                        f"[eval] step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in report.items() if k != "step"),
                        flush=True,
                    )
                    if writer:
                        for key, value in report.items():
                            writer.add_scalar(f"dev/{key}", value, step)
                with tempfile.TemporaryDirectory() as directory:
                    if engine is not None:
                        engine.save_checkpoint(directory, tag="deepspeed", client_state={"step": step})
                    elif rank == 0:
                        torch.save(
                            {
                                "model": module.state_dict(),
                                "optimizer": optimizer.state_dict(),
                                "schedule": schedule.state_dict(),
                                "client": {"step": step},
                            },
                            os.path.join(directory, "torch_state.pt"),
                        )
                    if step == optim.max_steps:
                        _export(engine, module, tokenizer, directory, rank, zero3)
                    if world_size > 1:
                        dist.barrier()
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))
                since_report = {"loss": 0.0, "batches": 0, "tokens": 0, "start": time.perf_counter()}
            if step >= optim.max_steps:
                break
    if writer:
        writer.close()


def _export(engine, module, tokenizer, directory: str, rank: int, zero3: bool) -> None:
    """Write the final model (ZeRO-3 shards gathered) and tokenizer to `directory/hf` on rank 0."""
    from glimmer_ray.model import GlimmerForConditionalGeneration

    state = engine._zero3_consolidated_16bit_state_dict() if zero3 else module.state_dict()  # every rank takes part
    if rank != 0:
        return
    export = GlimmerForConditionalGeneration(module.config)
    missing, unexpected = export.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [name for name in missing if not name.endswith("embed_tokens.weight")]
    if missing or unexpected:
        raise RuntimeError(f"export does not match the model: missing {missing}, unexpected {unexpected}")
    export.save_pretrained(os.path.join(directory, "hf"))
    tokenizer.save_pretrained(os.path.join(directory, "hf"))
