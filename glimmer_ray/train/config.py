"""The training job's configuration: one nested dataclass, loaded from YAML with dotted overrides.

Sections: model (architecture and initialisation), data (prepared data and lengths), optim, deepspeed,
scaling (mirrors `ray.train.ScalingConfig`), checkpoint, failure (restarts and fault injection), log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers.utils.hub import convert_file_size_to_int

from glimmer_ray.data import synthkilt
from glimmer_ray.data.stream import TokenizeConfig


@dataclass
class ModelSection:
    checkpoint: str | None = (
        None  # T5 checkpoint directory, or a GLIMMER export to continue from; null = random T5.1.1 of the shape below
    )
    d_model: int = 64  # random init: width d
    num_layers: int = 4  # random init: L, encoder and decoder each
    num_heads: int = 4  # random init: attention heads
    d_ff: int | None = None  # random init: gated FFN width; null = 8 d / 3
    dropout_rate: float = 0.1  # random init: dropout (T5.1.1 fine-tuning: 0.1)
    tie_embeddings: bool = False  # random init: the original T5's tied, rescaled output embedding (T5.1.1 unties it)
    live_proportion: float = 0.5  # alpha
    rerank_proportion: float = 0.5  # beta
    num_selected: int | None = 3  # m; null = no reranking (LUMEN / FiD)
    scoring: str = "first_token"  # first_token | mean_pool
    separate_question_encoder: bool = False  # the LUMEN-style question encoder ablation
    retrieval_prior: bool = (
        False  # score = learned score + gamma * retriever score (gamma learned; starts ranking as the retriever)
    )
    closed_book: bool = False  # the closed-book baseline: no passages at all


@dataclass
class DataSection:
    dir: str = "outputs/quickstart"  # output of jobs/prepare_data.py (retrieved/, tokenizer/)
    train_dirs: list[str] = field(
        default_factory=list
    )  # more prepare_data outputs whose train files join dir's, read with dir's tokenizer: counterfactual twins (facts_seed) ask the same questions with other answers, which only reading can give
    tasks: list[str] = field(default_factory=lambda: list(synthkilt.TASKS))  # trained and evaluated
    question_tokens: int = 48  # lq
    passage_tokens: int = 96  # lp
    answer_tokens: int = 16  # t
    num_passages: int = 10  # k retrieved passages read per example
    evidence_passages: int = 2  # g gold evidence passages per example in the stream (read by a gold reader warm-up)
    rows_per_task: int | None = None  # rows of each task per epoch; null = the largest task's size
    dev_limit_per_task: int | None = 60  # dev examples per task at each evaluation; null = all
    cache: bool = True  # materialise the tokenised stream once in the object store (epochs re-read it); false: re-read and re-tokenise every epoch (data larger than the object store)


@dataclass
class OptimSection:
    optimizer: str = "adafactor"  # adafactor (the paper) | adamw
    learning_rate: float = 1e-3  # constant after warm-up (the paper: 1e-4 at batch 128 from pre-trained T5)
    warmup_steps: int = 0  # linear warm-up from 0 over this many optimiser steps
    weight_decay: float = 0.0  # adamw only
    batch_size: int = 8  # examples per worker per step
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step
    max_steps: int = 300  # optimiser steps
    gradient_clipping: float = 1.0  # max global norm
    pdist_weight: float = 1.0  # lambda of the perplexity-distillation loss
    pdist_temperature: float = 1.0  # tau (the paper's ablation: 0.1 better)
    freeze_memory: bool = False  # the frozen-memory ablation: memory layers not trained
    rerank_warmup_steps: int = (
        0  # for these first steps the decoder reads the retriever's top m (the reranker still distils)
    )
    distill_start_step: int = (
        0  # before this step no perplexity distillation: the reader first learns to read (<= rerank_warmup_steps)
    )
    reader_warmup_steps: int = (
        0  # first steps reading only the retriever's first `reader_warmup_passages`: no reranking, no distillation
    )
    reader_warmup_passages: int = (
        1  # passages read during the reader warm-up (<= data.num_passages); k/p times cheaper steps
    )
    distill_gate: bool = False  # distil (and read the reranker's top m) only once an evaluation finds the teacher's held-out passage recall@m at least the retriever's: a teacher that does not read cannot teach
    reader_warmup_source: str = "retrieved"  # retrieved: the first reader_warmup_passages | gold: the data.evidence_passages gold evidence passages
    activation_checkpointing: bool = False  # each T5 block's activations recomputed in backward, not held from forward (large models: ~1/3 more compute)


@dataclass
class DeepSpeedSection:
    enabled: bool = True  # false: plain PyTorch (one worker only; for the step-time comparison)
    zero_stage: int = 2  # 1 | 2 | 3
    offload_optimizer: bool = False  # optimiser states in CPU memory
    offload_parameters: bool = False  # ZeRO-3 parameters in CPU memory
    bf16: bool = False  # bf16 mixed precision (GPUs with bf16)
    zero3_init: bool = (
        True  # ZeRO-3 from a checkpoint: each rank builds and reads only its partition (false: whole first)
    )
    live_parameters: int = (
        1_000_000_000  # ZeRO-3: gathered parameter elements kept alive between uses (DeepSpeed's default)
    )


@dataclass
class ScalingSection:  # mirrors ray.train.ScalingConfig
    num_workers: int = 2  # training workers (one per GPU on GPU nodes)
    use_gpu: bool = False  # NCCL on GPUs; gloo + DS_ACCELERATOR=cpu otherwise
    resources_per_worker: dict = field(default_factory=lambda: {"CPU": 1})  # per worker; leave CPUs for the data stream
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD


@dataclass
class CheckpointSection:
    every_steps: int = 100  # evaluate, save and report every this many steps
    num_to_keep: int = 2  # best checkpoints kept
    score_attribute: str = "dev_em"  # the metric that ranks checkpoints
    score_order: str = "max"  # max | min
    storage_path: str = "outputs/runs"  # Ray Train storage (local path or s3:// / gs:// URI)
    name: str = "glimmer-quickstart"  # run name below storage_path
    export: str = "last"  # last | best: the checkpoint export_dir gets (best: by score_attribute among those kept)


@dataclass
class FailureSection:
    max_failures: int = 0  # worker-group restarts allowed (from the last checkpoint)
    fail_at_step: int | None = None  # fault injection: one worker exits at this step, once
    fail_rank: int = 1  # fault injection: the rank that exits


@dataclass
class LogSection:
    every_steps: int = 10  # console / TensorBoard interval
    tensorboard: bool = True  # write TensorBoard events below the run directory


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    failure: FailureSection = field(default_factory=FailureSection)
    log: LogSection = field(default_factory=LogSection)
    export_dir: str | None = "outputs/quickstart/model"  # final model, Hugging Face layout; null = none
    export_max_shard_size: str = "2GB"  # largest safetensors file of the export (Hugging Face's max_shard_size)
    seed: int = 0  # weights, data order
    ray_address: str | None = None  # null: the cluster of `ray job submit`, else a new local one

    def resolve_paths(self) -> None:
        """Make local paths absolute: Ray workers do not share the driver's working directory."""
        self.data.dir = os.path.abspath(self.data.dir)
        self.data.train_dirs = [os.path.abspath(d) for d in self.data.train_dirs]
        if self.model.checkpoint:
            self.model.checkpoint = os.path.abspath(self.model.checkpoint)
        if "://" not in self.checkpoint.storage_path:
            self.checkpoint.storage_path = os.path.abspath(self.checkpoint.storage_path)
        if self.export_dir:
            self.export_dir = os.path.abspath(self.export_dir)

    def validate(self) -> None:
        if not self.deepspeed.enabled and self.scaling.num_workers != 1:
            raise ValueError("deepspeed.enabled=false (plain PyTorch) runs on exactly one worker")
        if self.model.num_selected is not None and self.model.num_selected > self.data.num_passages:
            raise ValueError(
                f"model.num_selected ({self.model.num_selected}) exceeds data.num_passages ({self.data.num_passages})"
            )
        if self.optim.max_steps < 1 or self.checkpoint.every_steps < 1:
            raise ValueError("optim.max_steps and checkpoint.every_steps must be positive")
        if self.optim.rerank_warmup_steps < 0:
            raise ValueError(f"optim.rerank_warmup_steps must be >= 0, got {self.optim.rerank_warmup_steps}")
        if self.optim.reader_warmup_steps < 0:
            raise ValueError(f"optim.reader_warmup_steps must be >= 0, got {self.optim.reader_warmup_steps}")
        if not 1 <= self.optim.reader_warmup_passages <= self.data.num_passages:
            raise ValueError(
                f"optim.reader_warmup_passages must be between 1 and data.num_passages ({self.data.num_passages}), "
                f"got {self.optim.reader_warmup_passages}"
            )
        if self.optim.reader_warmup_source not in ("retrieved", "gold"):
            raise ValueError(
                f"optim.reader_warmup_source must be 'retrieved' or 'gold', got {self.optim.reader_warmup_source!r}"
            )
        if self.data.evidence_passages < 1:
            raise ValueError(f"data.evidence_passages must be >= 1, got {self.data.evidence_passages}")
        if not 0 <= self.optim.distill_start_step <= self.optim.rerank_warmup_steps:
            raise ValueError(
                f"optim.distill_start_step ({self.optim.distill_start_step}) must be between 0 and optim.rerank_warmup_steps "
                f"({self.optim.rerank_warmup_steps}): the reranker must distil before it selects"
            )
        if self.checkpoint.export not in ("last", "best"):
            raise ValueError(f"checkpoint.export must be 'last' or 'best', got {self.checkpoint.export!r}")
        if self.checkpoint.score_order not in ("max", "min"):
            raise ValueError(f"checkpoint.score_order must be 'max' or 'min', got {self.checkpoint.score_order!r}")
        if self.optim.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.optim.warmup_steps}")
        try:
            shard_bytes = convert_file_size_to_int(self.export_max_shard_size)
        except ValueError:
            shard_bytes = 0
        if shard_bytes <= 0:
            raise ValueError(
                f"export_max_shard_size must be a positive size such as 2GB or 500MB, got {self.export_max_shard_size!r}"
            )


def task_paths(config: TrainConfig, split: str, directory: str | None = None) -> dict[str, str]:
    """The retrieved Parquet file of every configured task for `split` in `directory` (default data.dir)."""
    paths = {
        task: os.path.join(directory or config.data.dir, "retrieved", f"{task}-{split}.parquet")
        for task in config.data.tasks
    }
    missing = [path for path in paths.values() if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(f"retrieved data missing: {missing[0]} (run jobs/prepare_data.py first)")
    return paths


def train_paths(config: TrainConfig) -> dict[str, list[str]]:
    """The training files of every task: data.dir's, then those of each data.train_dirs."""
    found = [task_paths(config, "train", directory) for directory in [config.data.dir] + list(config.data.train_dirs)]
    return {task: [paths[task] for paths in found] for task in config.data.tasks}


def tokenize_config(config: TrainConfig) -> TokenizeConfig:
    data = config.data
    evidence = (
        data.evidence_passages
        if config.optim.reader_warmup_source == "gold" and config.optim.reader_warmup_steps
        else 0
    )
    return TokenizeConfig(data.question_tokens, data.passage_tokens, data.answer_tokens, data.num_passages, evidence)
