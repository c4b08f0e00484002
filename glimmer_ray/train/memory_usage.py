"""What a training worker holds: resident memory (RSS) of building the model, `deepspeed.initialize` and training
steps, phase by phase, from /proc/self/status (Linux). Used by `jobs/benchmark_zero.py`.

    before      RSS once Python, torch, DeepSpeed (its communication initialised) and the Ray worker are loaded
    build       the peak over model construction and checkpoint loading (`build_training_model`)
    initialize  the peak over `wrap_training_model` (`deepspeed.initialize`)
    step        the peak over the training steps: the largest of its parts' peaks, forward (with the distillation
                teacher), backward (with ZeRO-3's gradient reduction) and the optimiser's step, each measured alone

Each phase's peak is the high-water mark VmHWM, reset to the current RSS between phases through /proc/self/clear_refs.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from glimmer_ray.train.deepspeed import check_extension_locks

RECORDS = "memory_records.json"
STEP_PARTS = ("forward", "backward", "optimizer")  # a training step's parts, each with its own RSS peak


def _memory_kib(field_name: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in KiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}: this benchmark needs Linux")


def _reset_peak() -> None:
    """Start a new RSS high-water mark (VmHWM) at the current RSS."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def measure_worker(loop_config: dict) -> None:
    """Ray Train's entry point: one worker of `loop_config["train"]` (a TrainConfig as a dict) built, initialised and
    trained `bench["steps"]` steps on random tokens of `bench`'s shape, each phase's RSS peak measured; rank 0
    reports every worker's record with a checkpoint (`read_records`)."""
    os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported
    check_extension_locks()
    import deepspeed  # loaded before `before`: the library is not the model
    import ray.train
    import torch
    import torch.distributed as dist

    from glimmer_ray.config import from_dict
    from glimmer_ray.train.config import TrainConfig
    from glimmer_ray.train.step_timing import random_batch
    from glimmer_ray.train.worker import build_training_model, wrap_training_model

    train = from_dict(TrainConfig, loop_config["train"])
    bench = loop_config["bench"]
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)
    batch = random_batch(
        bench["batch_size"],
        bench["num_passages"],
        bench["question_tokens"],
        bench["passage_tokens"],
        bench["answer_tokens"],
        bench["model"]["vocab_size"],
        seed=rank,
    )
    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's communication (and its shared memory) is no model
    dist.barrier()
    before = _memory_kib("VmRSS")

    def phase(name: str, work):
        """`work()` after a barrier, with its seconds and its RSS peak (KiB) from the RSS it started at."""
        dist.barrier()
        _reset_peak()
        start = time.perf_counter()
        result = work()
        seconds, peak = time.perf_counter() - start, _memory_kib("VmHWM")
        print(
            f"[memory] rank {rank}: {name} peak {peak / 2**20:.2f} GiB (before the model {before / 2**20:.2f})",
            flush=True,
        )
        return result, seconds, peak

    built, build_seconds, build = phase(
        "build", lambda: build_training_model(train, bench["model"]["vocab_size"], torch.device("cpu"))
    )
    model, initialize_seconds, initialize = phase("initialize", lambda: wrap_training_model(train, built))

    def part(work):
        """`work()` with the RSS peak (KiB) over it, from the RSS it started at."""
        _reset_peak()
        return work(), _memory_kib("VmHWM")

    def train_steps() -> tuple[list[float], dict[str, int]]:
        """The steps, each cut in three: forward (with the teacher), backward (with ZeRO-3's gradient reduction),
        the optimiser's step; the peak of each part over all steps."""
        losses, peaks = [], dict.fromkeys(STEP_PARTS, 0)
        for _ in range(bench["steps"]):
            output, peak = part(lambda: model.engine(**batch, pdist_weight=train.optim.pdist_weight))
            peaks["forward"] = max(peaks["forward"], peak)
            _, peak = part(lambda: model.engine.backward(output.loss))
            peaks["backward"] = max(peaks["backward"], peak)
            _, peak = part(model.engine.step)
            peaks["optimizer"] = max(peaks["optimizer"], peak)
            losses.append(output.loss.item())
        return losses, peaks

    dist.barrier()
    start = time.perf_counter()
    losses, step_parts = train_steps()
    step_seconds = (time.perf_counter() - start) / bench["steps"]
    steps = max(step_parts.values())
    print(
        f"[memory] rank {rank}: steps peak {steps / 2**20:.2f} GiB ("
        + ", ".join(f"{name} {peak / 2**20:.2f}" for name, peak in step_parts.items())
        + ")",
        flush=True,
    )
    record = {
        "rank": rank,
        "before_gib": before / 2**20,
        "build_peak_gib": build / 2**20,
        "initialize_peak_gib": initialize / 2**20,
        "step_peak_gib": steps / 2**20,
        **{f"{name}_peak_gib": peak / 2**20 for name, peak in step_parts.items()},
        "build_seconds": build_seconds,
        "initialize_seconds": initialize_seconds,
        "seconds_per_step": step_seconds,
        "losses": losses,
        "deepspeed": deepspeed.__version__,
    }
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    with tempfile.TemporaryDirectory() as directory:  # Ray Train keeps a run's results with its checkpoints
        checkpoint = None
        if rank == 0:
            with open(os.path.join(directory, RECORDS), "w") as handle:
                json.dump(records, handle)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({"workers": len(records)}, checkpoint=checkpoint)


def read_records(checkpoint) -> list[dict]:
    """The worker records `measure_worker` reported with its checkpoint, by rank."""
    with checkpoint.as_directory() as directory, open(os.path.join(directory, RECORDS)) as handle:
        return sorted(json.load(handle), key=lambda record: record["rank"])
