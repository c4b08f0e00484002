"""The Ray Train worker of the training job: one `TrainLoopRunner` per worker, read top-down.

    set up     tokenizer, model, DeepSpeed engine (ZeRO 1/2/3) or a plain PyTorch optimiser and schedule
    restore    a restarted worker group's weights, optimiser state and step from Ray Train's checkpoint
    run        the stream's micro-batches: fault injection, `train_step`, then after each optimiser step
               `log` and, every checkpoint.every_steps, `evaluate_and_checkpoint`: a sharded dev
               evaluation, then on every rank save, a barrier, `ray.train.report`
    export     at the last step the final model (ZeRO-3 shards gathered), its tokenizer and the reading
               settings it was trained with (reading.json) in the checkpoint's `hf/`

Everything comes from the `TrainConfig` passed as `train_loop_config`; no module globals.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoTokenizer, T5Config
from transformers.optimization import Adafactor

from glimmer_ray.config import from_dict
from glimmer_ray.data.batches import model_inputs
from glimmer_ray.data.reading import ReadingConfig, save_reading
from glimmer_ray.eval.evaluate import dev_batches, predict, read_gold_evidence, score_predictions, teacher_selection
from glimmer_ray.eval.metrics import prediction_recall, reranker_recall, retriever_recall
from glimmer_ray.model import GlimmerConfig, GlimmerForConditionalGeneration
from glimmer_ray.model.modeling import glimmer_config_from_t5
from glimmer_ray.model.random_t5 import TIED_EMBEDDINGS, random_t5, t5_1_1_config
from glimmer_ray.runtime import return_freed_memory
from glimmer_ray.train.config import TrainConfig, task_paths, tokenize_config
from glimmer_ray.train.curriculum import curriculum_step
from glimmer_ray.train.deepspeed import check_extension_locks, deepspeed_config
from glimmer_ray.train.zero3 import (
    build_partitioned,
    gathered_parameters,
    is_partitioned,
    partitioned_config,
    save_sharded,
)

LOSS_KEYS = ("loss", "lm_loss", "pdist_loss")
RECALL_KEYS = ("reranker_recall", "retriever_recall", "reranker_passage_recall", "retriever_passage_recall")
TEACHER_KEYS = ("teacher_passage_recall", "pdist_target_max_prob")  # the distillation target: its top m, its sharpness


def reading_options(config: TrainConfig) -> dict[str, Any]:
    """The GLIMMER settings of the job's model section (split, m, scorer), applied over any checkpoint's."""
    section = config.model
    return dict(
        live_proportion=section.live_proportion,
        rerank_proportion=section.rerank_proportion,
        num_selected=section.num_selected,
        scoring=section.scoring,
        separate_question_encoder=section.separate_question_encoder,
        retrieval_prior=section.retrieval_prior,
    )


def random_t5_config(config: TrainConfig, vocab_size: int) -> T5Config:
    """The T5.1.1 shape of a from-scratch run (no checkpoint)."""
    section = config.model
    return t5_1_1_config(
        vocab_size=vocab_size,
        d_model=section.d_model,
        num_layers=section.num_layers,
        num_heads=section.num_heads,
        d_ff=section.d_ff,
        dropout_rate=section.dropout_rate,
        **(TIED_EMBEDDINGS if section.tie_embeddings else {}),
    )


def model_config(config: TrainConfig, vocab_size: int) -> GlimmerConfig:
    """The GLIMMER config `build_model` gives, without building the model."""
    if config.model.checkpoint:
        return partitioned_config(config.model.checkpoint, reading_options(config))[0]
    return glimmer_config_from_t5(random_t5_config(config, vocab_size), reading_options(config))


def build_model(
    config: TrainConfig, vocab_size: int, zero3_config: dict[str, Any] | None = None
) -> GlimmerForConditionalGeneration:
    """GLIMMER from a T5 checkpoint, from a GLIMMER checkpoint (a run continued: an earlier export), or from
    a random T5.1.1 of the configured shape (the same on every rank).

    With `zero3_config` (a ZeRO-3 DeepSpeed config) a checkpoint is loaded partitioned (`zero3.build_partitioned`:
    no rank ever holds the whole model); a from-scratch model is small and built whole, as without ZeRO-3."""
    section = config.model
    options = reading_options(config)
    if section.checkpoint:
        saved = AutoConfig.from_pretrained(section.checkpoint)
        if (
            saved.model_type == GlimmerConfig.model_type
            and saved.separate_question_encoder != section.separate_question_encoder
        ):
            raise ValueError(
                f"{section.checkpoint} was trained with separate_question_encoder={saved.separate_question_encoder}; "
                f"set model.separate_question_encoder to match (a question encoder cannot be added or dropped mid-training)"
            )
        if zero3_config is not None:
            return build_partitioned(section.checkpoint, zero3_config, **options)
        if saved.model_type == GlimmerConfig.model_type:
            return GlimmerForConditionalGeneration.from_pretrained(
                section.checkpoint, **options
            )  # the split and m as configured now
        return GlimmerForConditionalGeneration.from_t5(section.checkpoint, **options)
    t5 = random_t5(random_t5_config(config, vocab_size), seed=config.seed).train()
    return GlimmerForConditionalGeneration.from_t5(t5, **options)


def check_checkpoint_tokenizer(checkpoint: str | None, tokenizer_dir: str) -> None:
    """Refuse a checkpoint saved with another tokenizer than the training data's: its token ids would name
    other words (a pre-training corpus tokenised by its own tokenizer, say). Checkpoints without a saved
    tokenizer (a bare T5 download) are trusted."""
    if not checkpoint or not any(
        os.path.exists(os.path.join(checkpoint, name)) for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        return
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


def write_export(
    model_config: GlimmerConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    tokenizer,
    config: TrainConfig,
    target: str,
) -> None:
    """The model whose parameters `tensors` streams (name, tensor) in Hugging Face layout (fp32 safetensors, sharded
    at `config.export_max_shard_size`), its tokenizer and the reading settings it was trained with (`reading.json`)
    in `target`. Tied copies (`*.embed_tokens.weight`, a tied `lm_head.weight`) are dropped; any other name the model lacks, or a parameter
    missing from the stream, is an error."""
    with torch.device("meta"):
        skeleton = GlimmerForConditionalGeneration(model_config)
    expected = dict(skeleton.named_parameters())
    seen: set[str] = set()
    unexpected: list[str] = []

    def checked() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            if name not in expected:
                if name not in skeleton._tied_weights_keys:
                    unexpected.append(name)
                continue
            seen.add(name)
            yield name, tensor.detach().to("cpu", torch.float32)

    save_sharded(checked(), target, config.export_max_shard_size)
    missing = sorted(set(expected) - seen)
    if missing or unexpected:
        raise RuntimeError(f"export does not match the model: missing {missing}, unexpected {sorted(unexpected)}")
    model_config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    data = config.data
    save_reading(
        target,
        ReadingConfig(
            question_tokens=data.question_tokens,
            passage_tokens=data.passage_tokens,
            answer_tokens=data.answer_tokens,
            num_passages=data.num_passages,
            tasks=tuple(data.tasks),
        ),
    )


def export_checkpoint(config: TrainConfig, checkpoint_dir: str, export_dir: str) -> str:
    """Export the model of one of a run's checkpoints (any step, e.g. the best by dev EM before the run ended) as the
    run's final export would be: DeepSpeed's ZeRO shards consolidated to fp32 (`zero_to_fp32`, any stage) or the plain
    PyTorch state; the model's shape and split from `config`, the recipe the run was trained with."""
    if os.path.isdir(os.path.join(checkpoint_dir, "deepspeed")):
        if not config.scaling.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is first imported
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag="deepspeed")
    elif os.path.exists(os.path.join(checkpoint_dir, "torch_state.pt")):
        state = torch.load(os.path.join(checkpoint_dir, "torch_state.pt"), map_location="cpu")["model"]
    else:
        raise FileNotFoundError(f"{checkpoint_dir} holds no training checkpoint (deepspeed/ or torch_state.pt)")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(config.data.dir, "tokenizer"))
    write_export(model_config(config, len(tokenizer)), state.items(), tokenizer, config, export_dir)
    return export_dir


def engine_config(config: TrainConfig, hidden_size: int) -> dict[str, Any] | None:
    """The job's DeepSpeed config (None when DeepSpeed is off); `hidden_size` sizes ZeRO-3's buckets."""
    if not config.deepspeed.enabled:
        return None
    optim, section = config.optim, config.deepspeed
    return deepspeed_config(
        optim.batch_size,
        optim.gradient_accumulation_steps,
        section.zero_stage,
        section.offload_optimizer,
        section.offload_parameters,
        section.bf16,
        optim.optimizer,
        optim.learning_rate,
        optim.weight_decay,
        optim.gradient_clipping,
        optim.warmup_steps,
        hidden_size=hidden_size,
        live_parameters=section.live_parameters,
    )


@dataclass
class TrainingModel:
    """A worker's model ready to train: a DeepSpeed `engine` (its `module`) or the plain `module` with its own
    `optimizer` and warm-up `schedule`."""

    module: GlimmerForConditionalGeneration
    trainable: list[torch.nn.Parameter]
    engine: Any = None
    optimizer: torch.optim.Optimizer | None = None
    schedule: Any = None


def build_training_model(config: TrainConfig, vocab_size: int, device: torch.device) -> GlimmerForConditionalGeneration:
    """The job's model on `device` in training mode (memory frozen, activations checkpointed if asked); under ZeRO-3
    from a checkpoint built partitioned (`deepspeed.zero3_init`). Every rank calls it."""
    ds_config = engine_config(config, model_config(config, vocab_size).d_model)
    zero3 = ds_config is not None and config.deepspeed.zero_stage == 3
    if zero3 and device.type == "cpu":
        return_freed_memory()  # partitions, gathered parameters and buckets in host memory: no heap holes
    partitioned = zero3 and config.deepspeed.zero3_init
    model = build_model(config, vocab_size=vocab_size, zero3_config=ds_config if partitioned else None)
    if not is_partitioned(model):  # a partitioned model's slices are placed by DeepSpeed
        model.to(device)
    model.train()  # from_pretrained leaves a model in eval mode: dropout back on
    if config.optim.activation_checkpointing:  # Hugging Face's, on every T5 block (memory, live and decoder alike)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if config.optim.freeze_memory:
        for block in model.memory_blocks:
            block.requires_grad_(False)
    return model


def wrap_training_model(config: TrainConfig, model: GlimmerForConditionalGeneration) -> TrainingModel:
    """`model` wrapped by a DeepSpeed engine, or with a plain PyTorch optimiser and warm-up schedule (one worker: the
    reference for DeepSpeed's step time). Under ZeRO-3, `deepspeed.initialize` allocates this rank's share of the
    gradients and optimiser states."""
    optim = config.optim
    trainable = [p for p in model.parameters() if p.requires_grad]
    adafactor = (  # the paper's optimiser at a constant learning rate (after any warm-up)
        Adafactor(trainable, lr=optim.learning_rate, relative_step=False, scale_parameter=False, warmup_init=False)
        if optim.optimizer == "adafactor"
        else None
    )
    ds_config = engine_config(config, model.config.d_model)
    if ds_config is not None:
        import deepspeed  # after train_loop_per_worker set DS_ACCELERATOR

        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=trainable, optimizer=adafactor, config=ds_config
        )
        return TrainingModel(module=engine.module, trainable=trainable, engine=engine)
    optimizer = adafactor or torch.optim.AdamW(trainable, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: min(1.0, (done + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0
    )
    return TrainingModel(module=model, trainable=trainable, optimizer=optimizer, schedule=schedule)


@dataclass
class MetricsWindow:
    """Per-micro-batch values summed since `start`. A value's mean is over the micro-batches that gave it:
    recall only over ranked ones, the distillation target's values only over distilled ones."""

    start: float = field(default_factory=time.perf_counter)
    batches: int = 0  # micro-batches
    tokens: int = 0  # question, passage and answer tokens of those micro-batches
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, tokens: int, **values: float) -> None:
        """One micro-batch: its token count and the values it gave."""
        self.batches += 1
        self.tokens += tokens
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def mean(self, key: str) -> float:
        return self.sums.get(key, 0.0) / max(1, self.counts.get(key, 0))

    def means(self, keys: Iterable[str]) -> dict[str, float]:
        """The mean of each of `keys` that some micro-batch gave, in the order of `keys`."""
        return {key: self.mean(key) for key in keys if self.counts.get(key)}

    def reset(self) -> None:
        """An empty window starting now."""
        self.start = time.perf_counter()
        self.batches = self.tokens = 0
        self.sums.clear()
        self.counts.clear()


class TrainLoopRunner:
    """One worker's training run: set up (engine, optimiser, checkpoint restored) on construction, then `run`."""

    def __init__(self, config: TrainConfig) -> None:
        self.config, self.optim = config, config.optim
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(config.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(os.path.join(config.data.dir, "tokenizer"))
        self._set_up_engine()
        self.gate_open = not self.optim.distill_gate  # distillation allowed (optim.distill_gate: not yet)
        self.step = self._restore()  # optimiser steps done
        self.resumed_from = self.step
        # micro-batches already consumed: the data position of a resumed run
        self.skip = self.step * self.optim.gradient_accumulation_steps
        self.micro_step = 0
        self.first_loss = None  # the first loss this attempt saw, reported beside the running one
        self.run_dir = os.path.join(os.path.abspath(config.checkpoint.storage_path), config.checkpoint.name)
        self.writer = None
        if self.rank == 0 and config.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))
        self.shard = ray.train.get_dataset_shard("train")
        self.dev_paths = task_paths(config, "dev")
        self.dev_tokenize = dataclasses.replace(tokenize_config(config), evidence_passages=0)  # the retrieved only
        # the g gold evidence passages, the oracle reading (read_gold_evidence replaces the retrieved: tokenise one)
        self.gold_tokenize = dataclasses.replace(
            tokenize_config(config), num_passages=1, evidence_passages=config.data.evidence_passages
        )
        self.zero3 = self.engine is not None and config.deepspeed.zero_stage == 3
        self.window = MetricsWindow()  # since the last log line
        self.since_report = MetricsWindow()  # since the last report
        # the clocks start at the first batch: the stream's and DeepSpeed's start-up are not step time
        self.started = False

    def _set_up_engine(self) -> None:
        """The model on this worker's device in training mode, wrapped by a DeepSpeed engine or with a plain PyTorch
        optimiser and schedule (`set_up_model`)."""
        engine = wrap_training_model(self.config, build_training_model(self.config, len(self.tokenizer), self.device))
        self.engine, self.module, self.trainable = engine.engine, engine.module, engine.trainable
        self.optimizer, self.schedule = engine.optimizer, engine.schedule

    def _restore(self) -> int:
        """The step of the checkpoint Ray Train hands a restarted worker group, its weights and optimiser state
        loaded; 0 without one."""
        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return 0
        with checkpoint.as_directory() as directory:
            if self.engine is not None:
                _, client_state = self.engine.load_checkpoint(directory, tag="deepspeed")
            else:
                state = torch.load(os.path.join(directory, "torch_state.pt"), map_location=self.device)
                self.module.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
                self.schedule.load_state_dict(state["schedule"])
                client_state = state["client"]
            step = int(client_state["step"])
            self.gate_open = bool(client_state.get("gate_open", self.gate_open))
        if self.rank == 0:
            print(f"[train] resumed from the checkpoint of step {step}", flush=True)
        return step

    def run(self) -> None:
        """Epochs of the worker's shard until optim.max_steps optimiser steps are done."""
        while self.step < self.optim.max_steps:
            for batch in self.shard.iter_batches(
                batch_size=self.optim.batch_size, batch_format="numpy", drop_last=True
            ):
                if self.skip > 0:
                    self.skip -= 1
                    continue
                if not self.started:
                    self.started = True
                    self.window.start = self.since_report.start = time.perf_counter()
                self._inject_fault()
                if not self.train_step(batch):
                    continue  # gradient accumulation: no optimiser step yet
                if self.step % self.config.log.every_steps == 0:
                    self.log()
                if self.step % self.config.checkpoint.every_steps == 0 or self.step == self.optim.max_steps:
                    self.evaluate_and_checkpoint()
                if self.step >= self.optim.max_steps:
                    break
        if self.writer:
            self.writer.close()

    def _inject_fault(self) -> None:
        """Fault injection: rank failure.fail_rank exits at step failure.fail_at_step, once (a marker file in the
        run directory spares the restarted group)."""
        failure = self.config.failure
        if failure.fail_at_step != self.step or self.rank != failure.fail_rank:
            return
        marker = os.path.join(self.run_dir, ".fault_injected")
        if os.path.exists(marker):
            return
        os.makedirs(self.run_dir, exist_ok=True)
        open(marker, "w").close()
        print(f"[train] fault injection: rank {self.rank} exits at step {self.step}", flush=True)
        # Ray Train registers reports at its health checks (every 2 s): wait past one, so the
        # test knows which checkpoint must be resumed. (A real crash within 2 s of a report can
        # lose that report; the group then resumes from the checkpoint before it.)
        time.sleep(5)
        os._exit(1)

    def train_step(self, batch: dict[str, np.ndarray]) -> bool:
        """Forward and backward of one micro-batch, its values added to both windows; True when it completed
        an optimiser step."""
        closed_book = self.config.model.closed_book
        inputs = model_inputs(batch, self.device, closed_book=closed_book, eos_token_id=self.tokenizer.eos_token_id)
        inputs, arguments, reader_warmup = curriculum_step(
            inputs, self.step, self.optim, closed_book=closed_book, gate_open=self.gate_open
        )
        output = (self.module if self.engine is None else self.engine)(**inputs, **arguments)
        if self.engine is not None:
            self.engine.backward(output.loss)
            self.engine.step()
        else:
            (output.loss / self.optim.gradient_accumulation_steps).backward()
        self.micro_step += 1
        loss = output.loss.item()
        if self.first_loss is None:
            self.first_loss = loss
        tokens = int(inputs["question_mask"].sum() + inputs["passage_mask"].sum() + (inputs["labels"] != -100).sum())
        self.since_report.add(tokens, loss=loss)
        self.window.add(
            tokens,
            loss=loss,
            lm_loss=output.lm_loss.item(),
            pdist_loss=output.pdist_loss.item() if output.pdist_loss is not None else 0.0,
            **self._ranking_values(batch, output, reader_warmup),
        )
        if self.micro_step % self.optim.gradient_accumulation_steps:
            return False
        if self.engine is None:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.optim.gradient_clipping)
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad()
        self.step += 1
        return True

    def _ranking_values(self, batch: dict[str, np.ndarray], output: Any, reader_warmup: bool) -> dict[str, float]:
        """On a batch the reranker ranked: recall@m of its top m and of the retriever's first m, page and passage
        level. On a distilled batch: the distillation target's passage recall@m and its largest probability (near
        1/k: it teaches no ranking)."""
        values = {}
        ranked = output.rerank_scores is not None and not reader_warmup and not self.config.model.closed_book
        if ranked:  # the reader warm-up ranks nothing, nor does closed book
            m = output.selected.shape[1]
            # [b, m] the reranker's top m, even while the decoder reads the retriever's (rerank warm-up)
            reranked = torch.topk(output.rerank_scores.detach(), m, dim=1).indices.cpu()
            pages, gold_pages = batch["passage_pages"], batch["gold_pages"]
            keys, gold_passages = batch["passage_keys"], batch["gold_passages"]
            values["reranker_recall"] = reranker_recall(reranked, pages, gold_pages)
            values["retriever_recall"] = retriever_recall(m, pages, gold_pages)
            values["reranker_passage_recall"] = reranker_recall(reranked, keys, gold_passages, level="passage")
            values["retriever_passage_recall"] = retriever_recall(m, keys, gold_passages, level="passage")
        if output.pdist_target is not None:
            teacher = torch.topk(output.pdist_target, output.selected.shape[1], dim=1).indices.cpu()  # [b, m]
            values["teacher_passage_recall"] = reranker_recall(
                teacher, batch["passage_keys"], batch["gold_passages"], level="passage"
            )
            values["pdist_target_max_prob"] = (
                torch.softmax(output.pdist_target / self.optim.pdist_temperature, dim=1).max(1).values.mean().item()
            )
        return values

    def log(self) -> None:
        """The window's means printed and written to TensorBoard by rank 0; then a new window on every rank."""
        if self.rank == 0:
            seconds = time.perf_counter() - self.window.start
            metrics = self.window.means(LOSS_KEYS + RECALL_KEYS + TEACHER_KEYS)  # no recall during the reader warm-up
            metrics["tokens_per_second_per_worker"] = self.window.tokens / seconds
            metrics["seconds_per_step"] = seconds / (self.window.batches / self.optim.gradient_accumulation_steps)
            print(
                f"[train] step {self.step}/{self.optim.max_steps} "
                + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                flush=True,
            )
            self._write("train", metrics)
        self.window.reset()

    def evaluate_and_checkpoint(self) -> None:
        """A sharded dev evaluation, then on every rank: save (and export after the last step), a barrier, and
        `ray.train.report` of the same metrics and checkpoint, so every rank reports the same number of times."""
        train_seconds = time.perf_counter() - self.since_report.start  # training only: evaluation and saving come after
        scores = score_predictions(self._dev_predictions())
        gold = {} if self.config.model.closed_book else score_predictions(self._dev_predictions(gold=True))
        report = {
            "step": self.step,
            "resumed_from_step": self.resumed_from,
            "first_loss": self.first_loss,
            "train_loss": self.since_report.mean("loss"),
            "seconds_per_step": train_seconds
            / max(1, self.since_report.batches // self.optim.gradient_accumulation_steps),
            "tokens_per_second_per_worker": self.since_report.tokens / train_seconds,
            "dev_em": scores["average"]["em"],
            "dev_f1": scores["average"]["f1"],
            "dev_kilt_em": scores["average"]["kilt_em"],
            **{f"dev_em/{task}": value["em"] for task, value in scores.items() if task != "average"},
            **{f"gold_em/{task}": value["em"] for task, value in gold.items()},  # the reader alone
            **self._check_gate(),
        }
        if self.rank == 0:
            print(
                f"[eval] step {self.step}: " + " ".join(f"{k} {v:.3f}" for k, v in report.items() if k != "step"),
                flush=True,
            )
            self._write("dev", report)
        with tempfile.TemporaryDirectory() as directory:
            self._save(directory)
            if self.step == self.optim.max_steps:
                self.export(directory)
            if self.world_size > 1:
                dist.barrier()
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))
        self.since_report.reset()

    def _check_gate(self) -> dict[str, float]:
        """optim.distill_gate: once distillation is due within the next evaluation period, the teacher's held-out
        passage recall@m against the retriever's; the gate opens (for good) when the teacher is at least as good.
        Returns both recalls for the report (nothing when there is no gate to check)."""
        optim, config = self.optim, self.config
        due = self.step + config.checkpoint.every_steps > optim.distill_start_step
        if self.gate_open or not due or config.model.closed_book:
            return {}
        batches = dev_batches(
            self.dev_paths,
            os.path.join(config.data.dir, "tokenizer"),
            self.dev_tokenize,
            batch_size=optim.batch_size,
            limit_per_task=config.data.dev_limit_per_task,
            shard=(self.rank, self.world_size),
        )
        m = self.module.config.num_selected or config.data.num_passages
        records = teacher_selection(self.module, batches, m, device=self.device)
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        teacher = prediction_recall(records, "reranked_passages", "passage", m)
        retriever = prediction_recall(records, "retrieved_passages", "passage", m)
        self.gate_open = teacher >= retriever
        if self.rank == 0:
            verdict = "opens: distillation from here" if self.gate_open else "stays closed: no distillation yet"
            print(
                f"[gate] step {self.step}: teacher passage R@{m} {teacher:.3f} vs retriever {retriever:.3f}; {verdict}",
                flush=True,
            )
        return {"gate_teacher_passage_recall": teacher, "gate_retriever_passage_recall": retriever}

    def _dev_predictions(self, gold: bool = False) -> list[dict[str, Any]]:
        """Every rank answers its shard of the dev examples, reading its retrieved passages (or, with `gold`, its g
        gold evidence passages alone: the oracle, which measures the reader without distractors); the predictions
        of all ranks, on every rank."""
        config = self.config
        shard_batches = dev_batches(
            self.dev_paths,
            os.path.join(config.data.dir, "tokenizer"),
            self.gold_tokenize if gold else self.dev_tokenize,
            batch_size=self.optim.batch_size,
            limit_per_task=config.data.dev_limit_per_task,
            shard=(self.rank, self.world_size),
        )
        if gold:
            shard_batches = (read_gold_evidence(batch) for batch in shard_batches)
        predictions = predict(
            self.module,
            shard_batches,
            self.tokenizer,
            max_new_tokens=config.data.answer_tokens,
            closed_book=config.model.closed_book,
            fixed_length=self.zero3,
            num_selected=config.data.evidence_passages if gold else None,
            device=self.device,
            # while the curriculum reads the retriever's order, so does the evaluation: it measures the reader
            select_by="retriever" if self.step < self.optim.rerank_warmup_steps or not self.gate_open else "reranker",
        )
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, predictions)
            predictions = [p for part in gathered for p in part]
        return predictions

    def _save(self, directory: str) -> None:
        """The engine's checkpoint (every rank its ZeRO shards), or the plain PyTorch state (rank 0), with the step."""
        if self.engine is not None:
            self.engine.save_checkpoint(
                directory, tag="deepspeed", client_state={"step": self.step, "gate_open": self.gate_open}
            )
        elif self.rank == 0:
            torch.save(
                {
                    "model": self.module.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "schedule": self.schedule.state_dict(),
                    "client": {"step": self.step, "gate_open": self.gate_open},
                },
                os.path.join(directory, "torch_state.pt"),
            )

    def export(self, directory: str) -> None:
        """The final model (ZeRO-3 shards gathered), its tokenizer and the reading settings it was trained with
        (`reading.json`: token lengths, k, tasks) in `directory/hf`, written by rank 0."""
        # every rank takes part in gathering the ZeRO-3 shards, one parameter at a time
        tensors = gathered_parameters(self.module, self.rank) if self.zero3 else self.module.named_parameters()
        if self.rank != 0:
            for _ in tensors:
                pass
            return
        write_export(self.module.config, tensors, self.tokenizer, self.config, os.path.join(directory, "hf"))

    def _write(self, section: str, values: dict[str, float]) -> None:
        """TensorBoard scalars `section/key` at the current step (rank 0, when log.tensorboard)."""
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(f"{section}/{key}", value, self.step)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry point: one training worker, everything from `loop_config` (the TrainConfig as a dict)."""
    config = from_dict(TrainConfig, loop_config)
    if not config.scaling.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported, in the runner's set-up
    if config.deepspeed.enabled:
        check_extension_locks()
    TrainLoopRunner(config).run()
