"""Inference cost of FiD, LUMEN and GLIMMER side by side: formula FLOPs, measured FLOPs, wall-clock.

The paper's Figure 2 settings on one set of random weights of a realistic shape (default T5-base:
d 768, 12 layers), 48 question and 304 passage tokens, greedy answers of a fixed length. Passage
memory is pre-computed, as at serving time, and not timed. Variants run round-robin, example by
example, so that machine noise falls on all of them alike; ratios to FiD are the result to read
(glimmer_ray.eval.inference).

    python jobs/benchmark_inference.py --config jobs/configs/benchmark_inference.yaml
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from glimmer_ray.cli import write_report
from glimmer_ray.config import parse_job_args, to_dict
from glimmer_ray.eval.inference import InferenceBenchmarkConfig, run_inference_benchmark
from glimmer_ray.runtime import tune_cpu_allocator


@dataclass
class BenchmarkConfig(InferenceBenchmarkConfig):
    threads: int = 0  # torch threads; 0 = torch's default
    tune_allocator: bool = True  # keep large buffers on the heap (glimmer_ray.runtime.tune_cpu_allocator)
    output: str = "outputs/benchmark_inference.json"  # JSON written here


def main(config: BenchmarkConfig) -> dict:
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.tune_allocator:
        tune_cpu_allocator()
    report = {"config": to_dict(config), **run_inference_benchmark(config)}
    write_report(config.output, report)
    return report


if __name__ == "__main__":
    main(parse_job_args(BenchmarkConfig, __doc__.splitlines()[0], sys.argv[1:]))
