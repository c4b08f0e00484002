"""Evaluate trained readers on the retrieved dev (or training) sets: KILT metrics per task, reranker vs retriever recall@m.

    python jobs/evaluate.py --config jobs/configs/evaluate.yaml
    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/evaluate.yaml

Every model in `models` (directories exported by jobs/train.py) answers the same examples, read as it was
trained (its reading.json). Predictions go to `<output_dir>/predictions/<model>/<task>-dev-kilt.jsonl` in
KILT's submission format, the scores to `<output_dir>/metrics.json` (`glimmer_ray.eval.run`).
"""

from __future__ import annotations

import sys

from glimmer_ray.config import parse_job_args
from glimmer_ray.eval.run import EvaluateConfig, run_evaluation


def main(config: EvaluateConfig) -> dict:
    return run_evaluation(config)


if __name__ == "__main__":
    main(parse_job_args(EvaluateConfig, __doc__.splitlines()[0], sys.argv[1:]))
