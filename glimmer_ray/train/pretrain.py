"""Denoising pre-training of a T5.1.1 on the knowledge source's passages (text infilling).

GLIMMER is fine-tuned from a pre-trained T5.1.1 (the paper: T5.1.1 base/large/xl). Offline machines
cannot download one, and a randomly initialised reader trained on the KILT tasks alone learns to answer
from memory of the training questions but never to read its passages (on SynthKILT: dev EM at the
closed-book level after 1,750 steps with the gold passage always given). Pre-training first on
passages with a dense copy signal helps: the encoder reads a passage whose spans are each replaced by
one sentinel, and the decoder writes the whole original passage (BART's text infilling, in T5's
vocabulary), so every target token teaches the decoder to find and copy its input. Pre-training on the
benchmark's own passages also stores its facts in the weights; on SynthKILT, pre-train on a counterfactual
twin's passages instead (`facts_seed`, with `tokenizer_dir` the benchmark's tokenizer).

Reading a span is finding where the passage answers and copying what follows. The `copy` objective teaches
exactly that, on sequences no model can memorise: each is drawn token by token, uniformly, from the distinct
tokens of the passages; the input is a query (a few consecutive tokens of the sequence), </s>, the sequence
(the reader's question + passage), and the target the tokens that follow the query in it. On 2 CPUs a
from-scratch reader with the original T5's tied output embedding learns it after ~1,600 steps of 64 and
then reads held-out gold evidence; with T5.1.1's untied output layer it does not within 2,500 (measured with
jobs/dev/read_gold.py's copy pre-training, the same examples: docs/learning.md, "Can it copy at all?").
Reading among retrieved passages also needs the match: which of k same-family passages names the asked entity.
With `copy_passages` k > 1 the copy is read in Fusion-in-Decoder form (GLIMMER with every layer live, k passages):
one passage holds the query exactly, each other one a near miss of it (`copy_near_miss_tokens` of its tokens
changed) followed by other tokens, so only the exact match answers; `init_checkpoint` continues from an earlier
pre-training (e.g. the single-sequence copy). The weights are saved as the plain T5 they are.

    corrupt(ids, rng, ...)            one passage -> (input ids with sentinels, target = the passage)
    DenoisingBatches(passages, ...)   random batches of corrupted passages as padded tensors
    find_and_copy(sequence, rng, ...) one sequence -> (query, the tokens after it)
    CopyBatches(tokens, ...)          random find-and-copy batches on uniform random sequences (k passages: FiD form)
    teacher_forced_hits(logits, labels)      token and first-token accuracy counts (the first token: the match)
    pretrain_t5(data_dir, output_dir, ...)   the loop (jobs/pretrain.py runs it as a Ray task)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass

import numpy as np
import ray
import torch

from glimmer_ray.config import to_dict

OBJECTIVES = ("infill", "copy")  # pretrain_t5's objectives: DenoisingBatches, CopyBatches


def corrupt(
    ids: list[int],
    rng: np.random.Generator,
    first_sentinel: int,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    eos_token_id: int = 1,
) -> tuple[list[int], list[int]]:
    """Replace random spans (about `noise_density` of the tokens, spans of 1 to 2 * mean - 1 tokens)
    by one sentinel each (`first_sentinel`, then the ids below it, as T5's `<extra_id_N>`).

    Returns (input ids + </s>, target ids = the uncorrupted passage + </s>)."""
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must lie in (0, 1), got {noise_density}")
    if mean_span_length < 1.0:
        raise ValueError(f"mean_span_length must be at least 1, got {mean_span_length}")
    length = len(ids)
    if length < 2:
        return list(ids) + [eos_token_id], list(ids) + [eos_token_id]
    num_noise = max(1, round(length * noise_density))
    num_spans = max(1, min(length - 1, round(num_noise / mean_span_length)))
    starts = np.sort(rng.choice(length, size=num_spans, replace=False))
    corrupted, position, sentinel = [], 0, first_sentinel
    for start in starts.tolist():
        if start < position:  # overlaps the previous span
            continue
        span = int(rng.integers(1, max(2, round(2 * mean_span_length))))
        corrupted += ids[position:start] + [sentinel]
        sentinel -= 1
        position = min(length, start + span)
    corrupted += ids[position:]
    return corrupted + [eos_token_id], list(ids) + [eos_token_id]


class DenoisingBatches:
    """Random batches of corrupted passages: input_ids/attention_mask [b, l_in], labels [b, l_out]
    (-100 after the passage's </s>)."""

    def __init__(
        self,
        passages: list[list[int]],
        batch_size: int,
        first_sentinel: int,
        seed: int = 0,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
        eos_token_id: int = 1,
        pad_token_id: int = 0,
    ) -> None:
        if not passages:
            raise ValueError("no passages to pre-train on")
        self.passages = passages
        self.batch_size = batch_size
        self.first_sentinel = first_sentinel
        self.rng = np.random.default_rng(seed)
        self.noise_density = noise_density
        self.mean_span_length = mean_span_length
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def next(self) -> dict[str, torch.Tensor]:
        chosen = self.rng.integers(0, len(self.passages), size=self.batch_size)
        pairs = [
            corrupt(
                self.passages[i],
                self.rng,
                self.first_sentinel,
                self.noise_density,
                self.mean_span_length,
                self.eos_token_id,
            )
            for i in chosen.tolist()
        ]
        input_length = max(len(source) for source, _ in pairs)
        target_length = max(len(target) for _, target in pairs)
        input_ids = torch.full((self.batch_size, input_length), self.pad_token_id, dtype=torch.long)  # [b, l_in]
        labels = torch.full((self.batch_size, target_length), -100, dtype=torch.long)  # [b, l_out]
        for row, (source, target) in enumerate(pairs):
            input_ids[row, : len(source)] = torch.tensor(source)
            labels[row, : len(target)] = torch.tensor(target)
        attention_mask = torch.zeros_like(input_ids)
        for row, (source, _) in enumerate(pairs):
            attention_mask[row, : len(source)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


NEAR_MISS_AT = ("anywhere", "start")  # where a distractor's near miss differs from the query


def find_and_copy(
    sequence: list[int], rng: random.Random, query_tokens: int, copy_tokens: int
) -> tuple[list[int], list[int]]:
    """A find-and-copy example from `sequence`: (query = `query_tokens` consecutive tokens of it, target = the
    `copy_tokens` tokens that follow them), at a position drawn by `rng`."""
    if query_tokens < 1 or copy_tokens < 1:
        raise ValueError(f"query_tokens and copy_tokens must be at least 1, got {query_tokens} and {copy_tokens}")
    if len(sequence) < query_tokens + copy_tokens:
        raise ValueError(f"a sequence of {len(sequence)} tokens holds no query of {query_tokens} + {copy_tokens}")
    start = rng.randrange(query_tokens, len(sequence) - copy_tokens + 1)
    return sequence[start - query_tokens : start], sequence[start : start + copy_tokens]


class CopyBatches:
    """Random find-and-copy batches: each row a sequence of `sequence_tokens` tokens drawn uniformly from `tokens`;
    input_ids = query </s> sequence </s> [b, query + sequence + 2], labels = the copied tokens </s> [b, copy + 1].

    With `passages` k > 1, the reader's FiD inputs instead: question_ids = query </s> [b, query + 1], passage_ids
    [b, k, sequence + 1] holding the sequence and k - 1 distractors at random places, each a fresh random sequence
    into which a near miss of the query (`near_miss_tokens` of its tokens replaced) is written at a random position;
    labels as before (what follows the exact query)."""

    def __init__(
        self,
        tokens: list[int],
        batch_size: int,
        sequence_tokens: int = 32,
        query_tokens: int = 4,
        copy_tokens: int = 12,
        seed: int = 0,
        eos_token_id: int = 1,
        passages: int = 1,
        near_miss_tokens: int = 1,
        near_miss_at: str = "anywhere",
    ) -> None:
        if near_miss_at not in NEAR_MISS_AT:
            raise ValueError(f"near_miss_at must be one of {', '.join(NEAR_MISS_AT)}; got {near_miss_at!r}")
        if not tokens:
            raise ValueError("no tokens to draw copy sequences from")
        if passages > 1 and len(set(tokens)) < 2:
            raise ValueError("near misses need at least 2 distinct tokens")
        if passages < 1 or not 1 <= near_miss_tokens <= query_tokens:
            raise ValueError(
                f"passages must be >= 1 and near_miss_tokens in [1, query_tokens = {query_tokens}]; "
                f"got {passages} and {near_miss_tokens}"
            )
        if sequence_tokens < query_tokens + copy_tokens:
            raise ValueError(
                f"sequence_tokens ({sequence_tokens}) must hold query_tokens + copy_tokens "
                f"({query_tokens} + {copy_tokens})"
            )
        self.tokens = sorted(set(tokens))
        self.batch_size = batch_size
        self.sequence_tokens = sequence_tokens
        self.query_tokens = query_tokens
        self.copy_tokens = copy_tokens
        self.rng = random.Random(seed)
        self.eos_token_id = eos_token_id
        self.passages = passages
        self.near_miss_tokens = near_miss_tokens
        self.near_miss_at = near_miss_at

    def _random_sequence(self) -> list[int]:
        return [self.tokens[self.rng.randrange(len(self.tokens))] for _ in range(self.sequence_tokens)]

    def _distractor(self, query: list[int]) -> list[int]:
        """A fresh random sequence holding a near miss of `query` (some of its tokens replaced by other tokens)."""
        near_miss = list(query)
        if self.near_miss_at == "start":  # the first tokens differ, as a same-family name does, far from the answer
            positions = range(self.near_miss_tokens)
        else:
            positions = self.rng.sample(range(len(query)), self.near_miss_tokens)
        for position in positions:
            while near_miss[position] == query[position]:
                near_miss[position] = self.tokens[self.rng.randrange(len(self.tokens))]
        sequence = self._random_sequence()
        start = self.rng.randrange(0, self.sequence_tokens - self.query_tokens - self.copy_tokens + 1)
        sequence[start : start + self.query_tokens] = near_miss
        return sequence

    def next(self) -> dict[str, torch.Tensor]:
        queries, sequences, labels = [], [], []
        for _ in range(self.batch_size):
            sequence = self._random_sequence()
            query, target = find_and_copy(sequence, self.rng, self.query_tokens, self.copy_tokens)
            row = [sequence] + [self._distractor(query) for _ in range(self.passages - 1)]
            if self.passages > 1:
                self.rng.shuffle(row)  # the answering passage at a random place
            queries.append(query + [self.eos_token_id])
            sequences.append([passage + [self.eos_token_id] for passage in row])
            labels.append(target + [self.eos_token_id])
        if self.passages > 1:
            question_ids = torch.tensor(queries)  # [b, query + 1]
            passage_ids = torch.tensor(sequences)  # [b, k, sequence + 1]
            return {
                "question_ids": question_ids,
                "question_mask": torch.ones_like(question_ids),
                "passage_ids": passage_ids,
                "passage_mask": torch.ones_like(passage_ids),
                "labels": torch.tensor(labels),
            }
        input_ids = torch.cat(
            [torch.tensor(queries), torch.tensor(sequences)[:, 0]], dim=1
        )  # [b, query + sequence + 2]
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": torch.tensor(labels)}


def teacher_forced_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int, int]:
    """Greedy hits of teacher-forced `logits` [b, t, V] on `labels` [b, t] (-100 = ignored): (right tokens, target
    tokens, right first tokens, rows with a first token). In find-and-copy among near misses only the first written
    token needs the whole query matched (each later one follows from the token before), so its accuracy is the
    matching figure: 1/k for a reader that finds the query's last token and picks one of k passages at random."""
    targets = labels != -100  # [b, t]
    right = (logits.argmax(-1) == labels) & targets  # [b, t]
    return int(right.sum()), int(targets.sum()), int(right[:, 0].sum()), int(targets[:, 0].sum())


def pretrain_t5(
    data_dir: str,
    output_dir: str,
    tokenizer_dir: str | None = None,
    d_model: int = 64,
    num_layers: int = 6,
    num_heads: int = 4,
    d_ff: int | None = None,
    dropout_rate: float = 0.0,
    max_tokens: int = 96,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    objective: str = "infill",
    copy_sequence_tokens: int = 32,
    copy_query_tokens: int = 4,
    copy_tokens: int = 12,
    tie_embeddings: bool = False,
    copy_passages: int = 1,
    copy_near_miss_tokens: int = 1,
    copy_near_miss_at: str = "anywhere",
    init_checkpoint: str | None = None,
    steps: int = 600,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    warmup_steps: int = 100,
    weight_decay: float = 0.01,
    num_cpus: int = 1,
    use_gpu: bool = False,
    log_every_steps: int = 50,
    seed: int = 0,
) -> dict:
    """Pre-train a random T5.1.1 on `data_dir`'s passages (passages.parquet), tokenised by `tokenizer_dir`
    (default `data_dir/tokenizer`), and save it with the tokenizer to `output_dir` (written under a temporary
    name, renamed when complete). `objective` "infill" trains on corrupted passages (`DenoisingBatches`), "copy"
    on find-and-copy sequences of the passages' tokens (`CopyBatches`; `copy_passages` > 1: among near-miss
    distractors, read in FiD form). `init_checkpoint` (a T5 checkpoint with the same tokenizer) replaces the random
    T5.1.1 and its shape arguments. Returns the summary, also saved as `output_dir/pretrain.json`."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from glimmer_ray.data.reading import passage_text
    from glimmer_ray.model import GlimmerForConditionalGeneration
    from glimmer_ray.model.random_t5 import TIED_EMBEDDINGS, random_t5, t5_1_1_config

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    if copy_passages > 1 and objective != "copy":
        raise ValueError(f"copy_passages > 1 needs objective 'copy', got {objective!r}")
    torch.set_num_threads(max(1, num_cpus))
    device = torch.device("cuda" if use_gpu else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or os.path.join(data_dir, "tokenizer"))
    passages = pq.read_table(os.path.join(data_dir, "passages.parquet"), columns=["title", "text"]).to_pylist()
    encoded = tokenizer([passage_text(p["title"], p["text"]) for p in passages], add_special_tokens=False)["input_ids"]
    encoded = [ids[: max_tokens - 1] for ids in encoded]
    if objective == "copy":
        batches = CopyBatches(
            [token for ids in encoded for token in ids],  # CopyBatches keeps the distinct ones
            batch_size,
            copy_sequence_tokens,
            copy_query_tokens,
            copy_tokens,
            seed=seed,
            eos_token_id=tokenizer.eos_token_id,
            passages=copy_passages,
            near_miss_tokens=copy_near_miss_tokens,
            near_miss_at=copy_near_miss_at,
        )
    else:
        batches = DenoisingBatches(
            encoded,
            batch_size,
            first_sentinel=tokenizer.convert_tokens_to_ids("<extra_id_0>"),
            seed=seed,
            noise_density=noise_density,
            mean_span_length=mean_span_length,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    t5_config = t5_1_1_config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        d_ff=d_ff,
        dropout_rate=dropout_rate,
        **(TIED_EMBEDDINGS if tie_embeddings else {}),
    )
    if init_checkpoint:
        t5 = T5ForConditionalGeneration.from_pretrained(init_checkpoint)
        if t5.config.vocab_size != len(tokenizer):
            raise ValueError(
                f"{init_checkpoint} has {t5.config.vocab_size} token ids, the tokenizer {len(tokenizer)}: "
                "continue from a checkpoint pre-trained with this tokenizer"
            )
    else:
        t5 = random_t5(t5_config, seed=seed)
    if copy_passages > 1:  # FiD over the k passages: GLIMMER with every layer live, weights copied back when saved
        model = GlimmerForConditionalGeneration.from_t5(t5, live_proportion=1.0, num_selected=None)
    else:
        model = t5
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: min(1.0, (done + 1) / max(1, warmup_steps)))

    start = window_start = time.perf_counter()
    window_loss, window_tokens, window_steps, first_loss, loss_value = 0.0, 0, 0, None, float("nan")
    window_correct, window_targets, accuracy = 0, 0, float("nan")
    window_first_correct, window_rows, first_accuracy = 0, 0, float("nan")
    for step in range(1, steps + 1):
        batch = {key: value.to(device) for key, value in batches.next().items()}
        output = model(**batch)
        loss = output.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        loss_value = loss.item()
        first_loss = loss_value if first_loss is None else first_loss
        window_loss, window_steps = window_loss + loss_value, window_steps + 1
        correct, target_count, first_correct, rows = teacher_forced_hits(output.logits, batch["labels"])
        window_tokens += sum(int(batch[key].sum()) for key in batch if key.endswith("_mask")) + target_count
        window_correct, window_targets = window_correct + correct, window_targets + target_count
        window_first_correct, window_rows = window_first_correct + first_correct, window_rows + rows
        if step % log_every_steps == 0 or step == steps:
            accuracy = window_correct / max(1, window_targets)
            first_accuracy = window_first_correct / max(1, window_rows)
            print(
                f"[pretrain] step {step}/{steps} loss {window_loss / window_steps:.3f} token accuracy {accuracy:.3f} "
                f"first token {first_accuracy:.3f} "
                f"tokens/s {window_tokens / (time.perf_counter() - window_start):.0f} elapsed {time.perf_counter() - start:.0f} s",
                flush=True,
            )
            window_loss, window_tokens, window_steps, window_start = 0.0, 0, 0, time.perf_counter()
            window_correct, window_targets, window_first_correct, window_rows = 0, 0, 0, 0

    staging = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    if model is not t5:  # GLIMMER names its T5 weights as T5 does; its untrained scoring head stays out
        state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("rerank_head.")}
        missing, unexpected = t5.load_state_dict(state, strict=False)
        missing = [name for name in missing if "EncDecAttention.relative_attention_bias" not in name]
        if missing or unexpected:
            raise RuntimeError(
                f"the FiD reader's weights do not map onto T5: missing {missing}, unexpected {unexpected}"
            )
        model = t5
    model.cpu().save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    summary = {
        "passages": len(encoded),
        "objective": objective,
        "copy_passages": copy_passages if objective == "copy" else None,
        "init_checkpoint": init_checkpoint,
        "steps": steps,
        "first_loss": first_loss,
        "final_loss": loss_value,
        "final_token_accuracy": accuracy,  # teacher-forced, over the last logging window's target tokens
        "final_first_token_accuracy": first_accuracy,  # the first target token alone (copy: it needs the whole match)
        "seconds": time.perf_counter() - start,
    }
    with open(os.path.join(staging, "pretrain.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(staging, output_dir)  # only complete checkpoints carry the name
    return summary


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
    objective: str = "infill"  # infill (corrupted passage -> passage) | copy (find a query in a sequence, copy on)
    copy_sequence_tokens: int = 32  # copy: tokens per random sequence (drawn uniformly from the passages' tokens)
    copy_query_tokens: int = 4  # copy: consecutive tokens of the sequence given as the query
    copy_tokens: int = 12  # copy: tokens after the query to write
    tie_embeddings: bool = False  # the original T5's tied output embedding (random_t5.TIED_EMBEDDINGS)
    copy_passages: int = 1  # copy: k passages read in FiD form, one holding the query, the others a near miss of it
    copy_near_miss_tokens: int = 1  # copy, k > 1: query tokens changed in each distractor's near miss
    copy_near_miss_at: str = "anywhere"  # copy, k > 1: anywhere in the query | start (far from the span)
    init_checkpoint: str | None = None  # a T5 checkpoint to continue from (same tokenizer); null = a random T5.1.1
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


def run_pretraining(config: PretrainConfig) -> dict:
    """`pretrain_t5` as one Ray task with the CPUs or GPU the config asks for (in the caller's Ray session);
    an existing complete `output_dir` is reused unless overwrite=true."""
    config.data_dir, config.output_dir = os.path.abspath(config.data_dir), os.path.abspath(config.output_dir)
    config.tokenizer_dir = os.path.abspath(config.tokenizer_dir or os.path.join(config.data_dir, "tokenizer"))
    if config.objective not in OBJECTIVES:
        raise SystemExit(f"objective must be one of {', '.join(OBJECTIVES)}; got {config.objective!r}")
    if config.copy_passages < 1 or (config.copy_passages > 1 and config.objective != "copy"):
        raise SystemExit(f"copy_passages must be 1, or more with objective copy; got {config.copy_passages}")
    if not 1 <= config.copy_near_miss_tokens <= config.copy_query_tokens:
        raise SystemExit(
            f"copy_near_miss_tokens must lie in [1, copy_query_tokens = {config.copy_query_tokens}], "
            f"got {config.copy_near_miss_tokens}"
        )
    if config.copy_near_miss_at not in NEAR_MISS_AT:
        raise SystemExit(
            f"copy_near_miss_at must be one of {', '.join(NEAR_MISS_AT)}; got {config.copy_near_miss_at!r}"
        )
    if config.init_checkpoint:
        config.init_checkpoint = os.path.abspath(config.init_checkpoint)
        if not os.path.exists(os.path.join(config.init_checkpoint, "config.json")):
            raise SystemExit(f"init_checkpoint {config.init_checkpoint} holds no T5 checkpoint (config.json)")
    for needed in (os.path.join(config.data_dir, "passages.parquet"), config.tokenizer_dir):
        if not os.path.exists(needed):
            raise SystemExit(f"{needed} is missing: run jobs/prepare_data.py first")
    if os.path.exists(os.path.join(config.output_dir, "pretrain.json")) and not config.overwrite:
        print(f"[pretrain] reusing {config.output_dir}")
        with open(os.path.join(config.output_dir, "pretrain.json")) as handle:
            return json.load(handle)

    # loop (a Ray task on a worker with the CPUs or GPU asked for)
    settings = {key: value for key, value in to_dict(config).items() if key not in ("overwrite", "ray_address")}
    task = ray.remote(num_cpus=config.num_cpus, num_gpus=1 if config.use_gpu else 0)(pretrain_t5)
    summary = ray.get(task.remote(**settings))
    print(
        f"[pretrain] {summary['steps']} steps on {summary['passages']} passages in {summary['seconds']:.0f} s: "
        f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, "
        f"token accuracy {summary['final_token_accuracy']:.3f}; wrote {config.output_dir}"
    )
    return summary
