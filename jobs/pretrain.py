"""Pre-train a T5.1.1 on the knowledge source's passages (infilling or copying), for machines without a checkpoint.

    python jobs/pretrain.py --config jobs/configs/pretrain_quickstart.yaml
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain_quickstart.yaml

GLIMMER starts from a pre-trained T5; with a real one (`model.checkpoint` of the training job) skip this
job. Setup: passages of `jobs/prepare_data.py`'s output, tokenised with its tokenizer; a random T5.1.1 of
the configured shape. Loop (one Ray task, `num_cpus` threads or one GPU): corrupted passage -> whole
passage (`objective=infill`), or find a query in a random sequence of the passages' tokens and copy what follows
(`objective=copy`, with `tie_embeddings=true`: docs/learning.md), AdamW with linear warm-up
(`glimmer_ray.train.pretrain`). Cleanup: the model in Hugging Face
layout (safetensors) with the tokenizer in `output_dir`, written under a temporary name and renamed when
complete; an existing `output_dir` is reused unless overwrite=true. Point the training recipe's
`model.checkpoint` at it.
"""

from __future__ import annotations

import sys

from glimmer_ray.cli import ray_session
from glimmer_ray.config import parse_job_args
from glimmer_ray.train.pretrain import PretrainConfig, run_pretraining


def main(config: PretrainConfig) -> dict:
    with ray_session(config.ray_address, log_to_driver=True):
        return run_pretraining(config)


if __name__ == "__main__":
    main(parse_job_args(PretrainConfig, __doc__.splitlines()[0], sys.argv[1:]))
