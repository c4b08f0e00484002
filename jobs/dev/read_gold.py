"""Does a from-scratch reader learn to read? Train it on the gold evidence alone and score it reading the gold evidence.

    python jobs/dev/read_gold.py --config jobs/dev/configs/read_gold.yaml

The smallest form of reading: each question comes with its g gold evidence passages only (no distractors, no
reranking), and the held-out dev questions are scored reading theirs (the oracle of jobs/evaluate.py). A reader
that cannot learn this cannot learn the full task. One process, no Ray, plain PyTorch AdamW; the model is the
training job's random T5.1.1 (`model.*` as in jobs/train.py, `tie_embeddings` included). Prints the training loss
every `log_every` steps and the dev EM per task every `eval_every` steps; writes the curve as JSON to `output`.

`copy_steps` > 0 first pre-trains the reader to copy (docs/learning.md, "Can it copy at all?"): the question is
`copy_query_tokens` consecutive tokens of a passage, the passage is read whole, and the target is the
`copy_tokens` tokens that follow the query in it; `copy_source` "passages" draws the passages of the training
worlds (text a model can also memorise), "random" draws sequences of the same tokens at random, as often as the
text uses them (only copying helps), "uniform" draws each distinct token of that text equally often (no frequent
token makes the query ambiguous, and every output row is trained alike); `copy_passage_tokens` sets the length of
the random sequences. Teacher-forced token accuracy and the share of spans copied whole on the held-out world's
passages (or fresh random ones) are logged.
`distractors_min` / `distractors_max` add, each step, n of the retriever's passages that are not gold (its hardest
negatives, same-family names) beside the gold evidence: the curriculum on the number of distractors, gold-alone
batches mixed in when distractors_min is 0; `eval_retrieved` n also scores reading the retriever's first n, as the
training job's dev EM does. `copy_every` c > 0 makes every c-th step a find-and-copy batch among near misses in FiD
form (`CopyBatches`: `copy_passages` random sequences, one holding the query, the others a near miss of it with
`copy_near_miss_tokens` tokens changed `copy_near_miss_at` its start, as a same-family name differs far from the
answer). `distractor_source` "swapped" makes each distractor a minimal pair of the gold passage instead
(`swapped_distractors`): the same text with the subject's name and the answer exchanged for another question's of
the same relation, a person keeping the family name; only the name tells the passages apart. `eval_swapped` n
scores reading each dev question's gold passage beside n minimal pairs of it (`minimal_pairs`: can it choose by
the name alone?), `steps` 0 only evaluates, and `save_dir` keeps the trained reader. `checkpoint` may also be a
GLIMMER export (a reader trained on, e.g. jobs/train.py's gold phase). With `live_proportion` 1 the reader is
exactly Hugging Face's T5 reading `question + passage` (FiD with one passage; tests/model check the equality).
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoConfig

from glimmer_ray.cli import write_report
from glimmer_ray.config import parse_job_args, to_dict
from glimmer_ray.data import synthkilt
from glimmer_ray.data.batches import EVIDENCE_KEYS, model_inputs
from glimmer_ray.data.reading import passage_text
from glimmer_ray.data.stream import TokenizeBatch, TokenizeConfig
from glimmer_ray.eval.evaluate import dev_batches, predict, read_gold_evidence, score_predictions
from glimmer_ray.model import GlimmerConfig, GlimmerForConditionalGeneration
from glimmer_ray.model.random_t5 import TIED_EMBEDDINGS, random_t5, t5_1_1_config
from glimmer_ray.train.pretrain import CopyBatches, find_and_copy


@dataclass
class ReadGoldConfig:
    data_dir: str = "outputs/worlds"  # jobs/prepare_worlds.py (or prepare_data.py) output: retrieved/, tokenizer/
    tasks: list[str] = field(default_factory=lambda: ["nq", "tqa", "zsre", "trex"])  # the tasks whose answer is a span
    d_model: int = 128
    num_layers: int = 6
    num_heads: int = 4
    tie_embeddings: bool = False  # the original T5's tied output embedding (random_t5.TIED_EMBEDDINGS)
    checkpoint: str | None = None  # a T5 or GLIMMER checkpoint to start from (pretrain's, an export); null = random
    live_proportion: float = 0.6666666666666666  # alpha
    evidence_passages: int = 1  # g gold passages read per question
    distractors_min: int = 0  # each step reads the g gold passages and n retrieved non-gold ones (the hardest first),
    distractors_max: int = 0  # n drawn uniformly in [distractors_min, distractors_max] per step; 0, 0 = gold alone
    distractor_source: str = "retrieved"  # retrieved (the retriever's non-gold passages) | swapped (minimal pairs)
    eval_retrieved: int = 0  # also score reading the retriever's first n passages (as the recipe's dev EM); 0 = not
    eval_swapped: int = 0  # also score reading the gold passage beside n minimal pairs of it (dev names); 0 = not
    question_tokens: int = 32
    passage_tokens: int = 96
    answer_tokens: int = 12
    steps: int = 4000  # 0 = only evaluate the model as it is
    batch_size: int = 16
    learning_rate: float = 0.001  # AdamW, linear warm-up over warmup_steps, then constant
    warmup_steps: int = 100
    eval_every: int = 500
    log_every: int = 100
    dev_limit_per_task: int = 60
    copy_steps: int = 0  # copy pre-training steps before the gold-evidence training; 0 = none
    copy_source: str = "passages"  # passages (the training worlds' text) | random (its tokens, as frequent) | uniform
    copy_passage_tokens: int = 0  # length of the random / uniform sequences; 0 = each drawn passage's length
    copy_query_tokens: int = 6  # tokens of the passage given as the question
    copy_tokens: int = 12  # tokens after them to copy (the target)
    copy_every: int = 0  # > 0: every copy_every-th reading step is a copy batch among near misses instead (below)
    copy_passages: int = 5  # copy_every: k random sequences read in FiD form, one with the query,
    copy_near_miss_tokens: int = 2  # the others a near miss of it with this many tokens changed,
    copy_near_miss_at: str = "start"  # at its start (as a same-family name, far from the answer) | anywhere
    threads: int = 0  # torch threads; 0 = torch's default
    seed: int = 0
    output: str = "outputs/worlds/read_gold.json"
    save_dir: str | None = None  # the trained reader (a GLIMMER export) and the tokenizer; null = not saved


def _training_rows(config: ReadGoldConfig) -> list[dict]:
    rows = []
    for task in config.tasks:
        path = os.path.join(config.data_dir, "retrieved", f"{task}-train.parquet")
        if not os.path.exists(path):
            raise SystemExit(
                f"{path} is missing: run jobs/prepare_worlds.py (or prepare_data.py) for {config.data_dir}"
            )
        rows.extend(pq.read_table(path).to_pylist())
    random.Random(config.seed).shuffle(rows)
    return rows


def _passage_pools(config: ReadGoldConfig, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the training worlds' passages and of the held-out world's (`data_dir/passages.parquet`); a
    single-world `prepare_data` output has no worlds/ and trains on its own passages."""

    def read(paths: list[str]) -> list[list[int]]:
        texts = [passage_text(r["title"], r["text"]) for path in paths for r in pq.read_table(path).to_pylist()]
        return [ids[: config.passage_tokens - 1] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    held_out = os.path.join(config.data_dir, "passages.parquet")
    train = sorted(glob.glob(os.path.join(config.data_dir, "worlds", "train-*", "passages.parquet"))) or [held_out]
    return read(train), read([held_out])


def copy_batch(
    pool: list[list[int]], config: ReadGoldConfig, rng: random.Random, eos: int, tokens: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """A copy pre-training batch: question = `copy_query_tokens` consecutive tokens of a passage, passage = the
    passage whole (+ EOS), labels = the `copy_tokens` that follow the query (+ EOS). With `tokens` (copy_source
    "random": every token of the pool, flattened once; "uniform": its distinct tokens) each passage is replaced by
    `copy_passage_tokens` (or as many) tokens drawn at random from them, so nothing but the passage predicts its
    continuation. `pool` holds passages long enough to copy from (`_copy_pool`)."""
    query, span = config.copy_query_tokens, config.copy_tokens
    size = config.batch_size
    question = torch.zeros(size, query + 1, dtype=torch.long)  # [b, lq]
    passage = torch.zeros(size, 1, config.passage_tokens, dtype=torch.long)  # [b, 1, lp]
    labels = torch.full((size, span + 1), -100, dtype=torch.long)  # [b, t]
    for row in range(size):
        ids = rng.choice(pool)
        if tokens is not None:
            ids = [tokens[rng.randrange(len(tokens))] for _ in range(config.copy_passage_tokens or len(ids))]
        query_ids, target = find_and_copy(ids, rng, query, span)
        question[row, :query] = torch.tensor(query_ids)
        question[row, query] = eos
        passage[row, 0, : len(ids) + 1] = torch.tensor(ids + [eos])
        labels[row, :span] = torch.tensor(target)
        labels[row, span] = eos
    return {
        "question_ids": question,
        "question_mask": (question != 0).long(),
        "passage_ids": passage,
        "passage_mask": (passage != 0).long(),
        "labels": labels,
    }


def _copy_pool(passages: list[list[int]], config: ReadGoldConfig) -> tuple[list[list[int]], list[int] | None]:
    """The passages long enough to copy from and, for copy_source "random" / "uniform", the tokens to draw random
    sequences from (`copy_batch`)."""
    pool = [ids for ids in passages if len(ids) >= config.copy_query_tokens + config.copy_tokens]
    if not pool:
        raise SystemExit(
            f"no passage holds copy_query_tokens + copy_tokens = {config.copy_query_tokens + config.copy_tokens} tokens"
        )
    if config.copy_source == "passages":
        return pool, None
    tokens = [token for ids in pool for token in ids]
    return pool, sorted(set(tokens)) if config.copy_source == "uniform" else tokens


def with_distractors(batch: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """The batch reading its g gold evidence passages and the first `count` retrieved passages that are not gold
    (the retriever's hardest negatives: same-family names), gold first (FiD's reading ignores the order).
    `batch` is tokenised with at least g + count retrieved passages."""
    gold = read_gold_evidence(batch)
    if count == 0:
        return gold
    ids, masks = [], []
    for row, keys in enumerate(batch["passage_keys"]):
        others = [index for index, key in enumerate(keys) if key not in set(batch["evidence_keys"][row])][:count]
        if len(others) < count:
            raise ValueError(f"a batch row has {len(others)} non-gold retrieved passages; {count} asked")
        ids.append(batch["passage_ids"][row][others])  # [count, lp]
        masks.append(batch["passage_mask"][row][others])
    return {
        **gold,
        "passage_ids": np.concatenate([gold["passage_ids"], np.stack(ids)], axis=1),  # [b, g + count, lp]
        "passage_mask": np.concatenate([gold["passage_mask"], np.stack(masks)], axis=1),
        "passage_scores": np.zeros((len(ids), gold["passage_ids"].shape[1] + count), dtype=np.float32),  # [b, g+n]
    }


PASSAGE_COLUMNS = ("passage_ids", "passage_pages", "passage_titles", "passage_texts", "passage_scores")


def relation_key(row: dict) -> str | None:
    """The task and the question with its subject (the gold page's title) left out: the questions of one relation
    share it ("nq|where was {s} born"). None when the question does not name the gold page's title."""
    titles = list(row["gold_titles"])
    if not titles or titles[0] not in row["input"]:
        return None
    return f"{row['task']}|{row['input'].replace(titles[0], '{s}')}"


def swap_donors(rows: list[dict]) -> dict[str, list[tuple[str, str]]]:
    """Per relation (`relation_key`), the (subject, answer) pairs of its questions: the names and answers that
    `swapped_distractors` writes into a gold passage."""
    donors: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        key = relation_key(row)
        if key is not None and len(row["answers"]):
            donors.setdefault(key, []).append((row["gold_titles"][0], list(row["answers"])[0]))
    return donors


def swapped_distractors(row: dict, count: int, donors: dict[str, list[tuple[str, str]]], rng: random.Random) -> dict:
    """`row` with its first `count` retrieved non-gold passages replaced by minimal pairs of its gold passage: the
    same title and text with the subject's name and the answer exchanged for another question's of the same
    relation. A name of several words keeps all but its first ("Driamtork Bondtraessun" -> "Heilbrerk
    Bondtraessun", as a relative's; "Krelth Works" -> "Dorn Works"), so only that word tells the passages apart.
    The row is returned unchanged (the retriever's distractors stay) when the question does not name the gold
    page, the gold text does not state the answer, or its relation has too few other names and answers."""
    key = relation_key(row)
    answer = list(row["answers"])[0] if len(row["answers"]) else ""
    if count == 0 or key is None or not answer or answer not in row["gold_texts"][0]:
        return row
    title, text = row["gold_titles"][0], row["gold_texts"][0]
    first, rest = title.split(" ")[0], title.split(" ")[1:]
    candidates = sorted({(t.split(" ")[0], a) for t, a in donors[key] if a != answer and t.split(" ")[0] != first})
    gold = set(row["gold_ids"])
    others = [index for index, passage in enumerate(row["passage_ids"]) if passage not in gold][:count]
    if len(candidates) < count or len(others) < count:
        return row
    swapped = {column: list(row[column]) for column in PASSAGE_COLUMNS}
    for number, (index, (name, other_answer)) in enumerate(zip(others, rng.sample(candidates, count))):
        other = " ".join([name, *rest])
        swapped["passage_ids"][index] = f"swap-{number}"
        swapped["passage_pages"][index] = f"swap-{number}"
        swapped["passage_titles"][index] = other
        # the answer first through a placeholder, so that a name inside it is not exchanged twice
        swapped["passage_texts"][index] = text.replace(answer, "\0").replace(title, other).replace("\0", other_answer)
    return {**row, **swapped}


def minimal_pairs(row: dict, count: int, donors: dict[str, list[tuple[str, str]]], rng: random.Random) -> dict | None:
    """`row` reading its gold passage and `count` minimal pairs of it (`swapped_distractors`) as its only
    retrieved passages; None when the row cannot be swapped."""
    swapped = swapped_distractors(row, count, donors, rng)
    if swapped is row:
        return None
    swaps = [index for index, key in enumerate(swapped["passage_ids"]) if str(key).startswith("swap-")]
    gold = dict(zip(PASSAGE_COLUMNS, (row["gold_ids"][0], row["gold_page_ids"][0], row["gold_titles"][0],
                                      row["gold_texts"][0], 0.0)))  # fmt: skip
    return {**row, **{column: [gold[column]] + [swapped[column][i] for i in swaps] for column in PASSAGE_COLUMNS}}


def _minimal_pair_files(paths: dict[str, str], count: int, directory: str, seed: int) -> dict[str, str]:
    """Per task, the dev questions that can be swapped, each reading its gold passage beside `count` minimal pairs
    made of the same file's names and answers (`minimal_pairs`), written as `directory/<task>-dev.parquet`."""
    os.makedirs(directory, exist_ok=True)
    written = {}
    for task, path in paths.items():
        rows = pq.read_table(path).to_pylist()
        donors, rng = swap_donors(rows), random.Random(seed)
        paired = [pair for pair in (minimal_pairs(row, count, donors, rng) for row in rows) if pair is not None]
        if not paired:
            raise SystemExit(f"no {task} dev question can be read beside {count} minimal pairs; lower eval_swapped")
        written[task] = os.path.join(directory, f"{task}-dev.parquet")
        pq.write_table(pa.Table.from_pylist(paired), written[task])
    return written


def save_reader(model, tokenizer, save_dir: str) -> None:
    """Write the reader (a GLIMMER export: `from_pretrained(save_dir)`) and the tokenizer under a temporary name,
    then move it into place, as jobs/pretrain.py does: an interrupted write leaves the previous one whole."""
    staging = save_dir.rstrip("/") + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(save_dir, ignore_errors=True)
    os.replace(staging, save_dir)


def _training_step(model, optimizer, schedule, inputs: dict[str, torch.Tensor]) -> float:
    """One AdamW step on the reader's LM loss over `inputs` (gradients clipped at norm 1); returns the loss."""
    loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _copy_pretraining(model, optimizer, schedule, config: ReadGoldConfig, tokenizer) -> list[dict]:
    """Train `model` on `copy_batch`es for `copy_steps`; returns its curve (loss, held-out token accuracy)."""
    rng, eos = random.Random(config.seed + 1), tokenizer.eos_token_id
    train_passages, held_out_passages = _passage_pools(config, tokenizer)
    (train_pool, train_tokens), (held_out_pool, held_out_tokens) = (
        _copy_pool(train_passages, config),
        _copy_pool(held_out_passages, config),
    )
    print(f"[read_gold] copy pre-training ({config.copy_source}) on {len(train_pool)} passages", flush=True)
    curve, losses, start = [], [], time.perf_counter()
    for step in range(1, config.copy_steps + 1):
        batch = copy_batch(train_pool, config, rng, eos, train_tokens)
        losses.append(_training_step(model, optimizer, schedule, batch))
        if step % config.log_every == 0 or step == config.copy_steps:
            batch = copy_batch(held_out_pool, config, rng, eos, held_out_tokens)
            model.eval()
            with torch.no_grad():
                predicted = model(**batch).logits.argmax(-1)  # [b, t]
            model.train()
            valid = batch["labels"] != -100
            right = (predicted == batch["labels"]) | ~valid  # [b, t]
            accuracy = float((right & valid).sum() / valid.sum())
            whole = float(right.all(-1).float().mean())
            point = {
                "copy_step": step,
                "minutes": (time.perf_counter() - start) / 60,
                "loss": float(np.mean(losses[-config.log_every :])),
                "held_out_token_accuracy": round(accuracy, 4),
                "held_out_spans_whole": round(whole, 4),
            }
            curve.append(point)
            print(
                f"[read_gold] copy step {step} loss {point['loss']:.3f} held-out token accuracy {accuracy:.3f},"
                f" spans whole {whole:.3f}",
                flush=True,
            )
    return curve


def main(config: ReadGoldConfig) -> dict:
    # setup
    unknown = sorted(set(config.tasks) - set(synthkilt.TASKS))
    if unknown or not config.tasks:
        raise SystemExit(f"tasks must be a non-empty list of {', '.join(synthkilt.TASKS)}; got {config.tasks}")
    if config.steps < 0 or config.eval_every < 1 or config.evidence_passages < 1:
        raise SystemExit("steps must be at least 0, eval_every and evidence_passages at least 1")
    if not 0 <= config.distractors_min <= config.distractors_max or min(config.eval_retrieved, config.eval_swapped) < 0:
        raise SystemExit(
            "distractors_min and distractors_max must satisfy 0 <= distractors_min <= distractors_max, and "
            f"eval_retrieved, eval_swapped >= 0; got {config.distractors_min}, {config.distractors_max}, "
            f"{config.eval_retrieved}, {config.eval_swapped}"
        )
    if config.distractor_source not in ("retrieved", "swapped"):
        raise SystemExit(f"distractor_source must be 'retrieved' or 'swapped', got {config.distractor_source!r}")
    if config.copy_source not in ("passages", "random", "uniform"):
        raise SystemExit(f"copy_source must be 'passages', 'random' or 'uniform', got {config.copy_source!r}")
    if config.copy_steps < 0 or config.copy_every < 0 or config.copy_query_tokens < 1 or config.copy_tokens < 1:
        raise SystemExit("copy_steps and copy_every must be >= 0 and copy_query_tokens, copy_tokens >= 1")
    copy_length = config.copy_query_tokens + config.copy_tokens
    if config.copy_passage_tokens and not copy_length <= config.copy_passage_tokens < config.passage_tokens:
        raise SystemExit(
            f"copy_passage_tokens must be 0 or in [copy_query_tokens + copy_tokens, passage_tokens) = "
            f"[{copy_length}, {config.passage_tokens}), got {config.copy_passage_tokens}"
        )
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rows = _training_rows(config)
    tokenizer_dir = os.path.join(config.data_dir, "tokenizer")
    lengths = (config.question_tokens, config.passage_tokens, config.answer_tokens)
    # training batches hold the retriever's first g + distractors_max (the distractors are drawn from them)
    tokenize_config = TokenizeConfig(
        *lengths,
        num_passages=config.evidence_passages + config.distractors_max,
        evidence_passages=config.evidence_passages,
    )
    tokenize = TokenizeBatch(tokenizer_dir, tokenize_config)
    evidence_config = TokenizeConfig(*lengths, num_passages=1, evidence_passages=config.evidence_passages)
    retrieved_config = TokenizeConfig(*lengths, num_passages=max(1, config.eval_retrieved), evidence_passages=0)
    if config.checkpoint and AutoConfig.from_pretrained(config.checkpoint).model_type == GlimmerConfig.model_type:
        source = None  # a GLIMMER export (a run continued): read as it is, at this live_proportion
    elif config.checkpoint:  # its shape and output layer replace d_model, num_layers, num_heads, tie_embeddings
        source = config.checkpoint
    else:
        t5_config = t5_1_1_config(
            vocab_size=len(tokenize.tokenizer),
            d_model=config.d_model,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            dropout_rate=0.0,
            **(TIED_EMBEDDINGS if config.tie_embeddings else {}),
        )
        source = random_t5(t5_config, seed=config.seed)
    if source is None:
        model = GlimmerForConditionalGeneration.from_pretrained(
            config.checkpoint, live_proportion=config.live_proportion, num_selected=None
        ).train()
    else:
        model = GlimmerForConditionalGeneration.from_t5(
            source, live_proportion=config.live_proportion, num_selected=None
        ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
    dev_paths = {task: os.path.join(config.data_dir, "retrieved", f"{task}-dev.parquet") for task in config.tasks}

    readings = {"": (dev_paths, evidence_config, read_gold_evidence, config.evidence_passages)}
    if config.eval_retrieved:
        readings["retrieved/"] = (dev_paths, retrieved_config, lambda batch: batch, config.eval_retrieved)
    if config.eval_swapped:
        directory = os.path.splitext(config.output)[0] + "-minimal-pairs"
        paths = _minimal_pair_files(dev_paths, config.eval_swapped, directory, config.seed)
        paired_config = TokenizeConfig(*lengths, num_passages=config.eval_swapped + 1, evidence_passages=0)
        readings["swapped/"] = (paths, paired_config, lambda batch: batch, config.eval_swapped + 1)

    def evaluate() -> dict[str, float]:
        """Dev EM per task (and their average) reading the gold evidence and, with eval_retrieved n, the retriever's
        first n (keys `retrieved/<task>`), with eval_swapped n the gold passage beside n minimal pairs
        (`swapped/<task>`)."""
        em = {}
        for prefix, (paths, reading_config, read, num_selected) in readings.items():
            batches = dev_batches(paths, tokenizer_dir, reading_config, 32, limit_per_task=config.dev_limit_per_task)
            predictions = predict(
                model,
                (read(b) for b in batches),
                tokenize.tokenizer,
                max_new_tokens=config.answer_tokens,
                num_selected=num_selected,
            )
            em.update({f"{prefix}{task}": round(s["em"], 4) for task, s in score_predictions(predictions).items()})
        model.train()
        return em

    # loop
    copy_curve = _copy_pretraining(model, optimizer, schedule, config, tokenize.tokenizer) if config.copy_steps else []
    curve, losses, copy_losses, start, position = [], [], [], time.perf_counter(), 0
    rng, near_misses = random.Random(config.seed + 2), None
    if config.copy_every:
        train_passages, _ = _passage_pools(config, tokenize.tokenizer)
        near_misses = CopyBatches(
            [token for ids in train_passages for token in ids],
            config.batch_size,
            config.copy_passage_tokens or config.copy_query_tokens + config.copy_tokens,
            config.copy_query_tokens,
            config.copy_tokens,
            seed=config.seed + 3,
            eos_token_id=tokenize.tokenizer.eos_token_id,
            passages=config.copy_passages,
            near_miss_tokens=config.copy_near_miss_tokens,
            near_miss_at=config.copy_near_miss_at,
        )
    donors = swap_donors(rows) if config.distractor_source == "swapped" else {}
    if donors:
        sample = rows[:1000]
        swappable = sum(
            swapped_distractors(r, config.distractors_max, donors, random.Random(0)) is not r for r in sample
        )
        print(f"[read_gold] minimal pairs for {swappable / len(sample):.2f} of the questions (the rest: retrieved)")
    print(f"[read_gold] {len(rows)} training questions, {sum(p.numel() for p in model.parameters())} parameters")
    if config.steps == 0:
        em = evaluate()
        curve.append({"step": 0, **em})
        print(f"[read_gold] step 0: dev EM {json.dumps(em)}", flush=True)
    for step in range(1, config.steps + 1):
        chunk = rows[position : position + config.batch_size]
        position = position + config.batch_size if position + 2 * config.batch_size <= len(rows) else 0
        if near_misses is not None and step % config.copy_every == 0:
            inputs = near_misses.next()  # [b, k, copy_passage_tokens + 1] passages
        else:
            count = rng.randint(config.distractors_min, config.distractors_max)
            if donors:
                chunk = [swapped_distractors(r, count, donors, rng) for r in chunk]
            batch = tokenize({key: np.array([r[key] for r in chunk], dtype=object) for key in chunk[0]})
            batch = with_distractors(batch, count)
            inputs = {k: v for k, v in model_inputs(batch, torch.device("cpu")).items() if k not in EVIDENCE_KEYS}
        copying = near_misses is not None and step % config.copy_every == 0
        (copy_losses if copying else losses).append(_training_step(model, optimizer, schedule, inputs))
        if step % config.log_every == 0:
            copied = f", among near misses {np.mean(copy_losses[-10:]):.3f}" if copy_losses else ""
            print(f"[read_gold] step {step} loss {np.mean(losses[-config.log_every :]):.3f}{copied}", flush=True)
        if step % config.eval_every == 0 or step == config.steps:
            em = evaluate()
            point = {"step": step, "minutes": (time.perf_counter() - start) / 60}
            point["loss"] = float(np.mean(losses[-config.log_every :]))
            if copy_losses:
                point["near_miss_copy_loss"] = float(np.mean(copy_losses[-10:]))
            curve.append({**point, **em})
            print(f"[read_gold] step {step} ({point['minutes']:.1f} min): dev EM {json.dumps(em)}", flush=True)

    # report
    report = {"config": to_dict(config), "copy_curve": copy_curve, "curve": curve}
    write_report(config.output, report)
    if config.save_dir:
        save_reader(model, tokenize.tokenizer, config.save_dir)
        print(f"[read_gold] saved the reader to {config.save_dir}", flush=True)
    return report


if __name__ == "__main__":
    main(parse_job_args(ReadGoldConfig, __doc__.splitlines()[0], sys.argv[1:]))
