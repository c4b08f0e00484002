"""How many evaluated questions ask about evidence no training question had as gold (a research probe).

    python jobs/dev/unseen_gold.py --config jobs/dev/configs/unseen_gold.yaml

A reranker that learned which passages tend to help (a page prior), not which passage answers the
question, fails on exactly these examples. Per task: the share of the `split` examples of `data_dir` none
of whose gold passages (and, apart, pages) is the gold of any training example of `data_dir` and
`train_dirs` (all tasks together). Writes `output` as JSON.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from glimmer_ray.cli import write_report
from glimmer_ray.config import parse_job_args
from glimmer_ray.data import synthkilt


@dataclass
class UnseenGoldConfig:
    data_dir: str = "outputs/quickstart"  # jobs/prepare_data.py output (retrieved/)
    train_dirs: list[str] = field(default_factory=list)  # more prepared directories trained on (data.train_dirs)
    tasks: list[str] = field(default_factory=lambda: list(synthkilt.TASKS))  # tasks whose examples are counted
    split: str = "dev"  # dev | train (train: 0 by construction, a check)
    limit_per_task: int | None = None  # first examples per task, as jobs/evaluate.py reads them; null = all
    output: str = "outputs/quickstart/unseen_gold.json"  # the shares, per task and level


def training_gold(directories: list[str]) -> dict[str, set[str]]:
    """Every gold passage id and page id of the training examples of the prepared `directories`."""
    seen: dict[str, set[str]] = {"passage": set(), "page": set()}
    for directory in directories:
        if not os.path.isdir(os.path.join(directory, "retrieved")):
            raise SystemExit(
                f"{directory}/retrieved not found: data_dir and train_dirs must be jobs/prepare_data.py outputs"
            )
        for task in synthkilt.TASKS:
            path = os.path.join(directory, "retrieved", f"{task}-train.parquet")
            if not os.path.exists(path):  # prepared with fewer tasks
                continue
            table = pq.read_table(path, columns=["gold_ids", "gold_page_ids"]).to_pydict()
            for ids, pages in zip(table["gold_ids"], table["gold_page_ids"]):
                seen["passage"].update(ids)
                seen["page"].update(pages)
    return seen


def unseen_shares(path: str, seen: dict[str, set[str]], limit: int | None) -> dict[str, float]:
    """Share of the first `limit` examples of a retrieved file whose gold passages (pages) are all unseen."""
    table = pq.read_table(path, columns=["gold_ids", "gold_page_ids"]).slice(0, limit or None).to_pydict()
    rows = list(zip(table["gold_ids"], table["gold_page_ids"]))
    return {
        "passage": sum(not set(ids) & seen["passage"] for ids, _ in rows) / max(1, len(rows)),
        "page": sum(not set(pages) & seen["page"] for _, pages in rows) / max(1, len(rows)),
    }


def main(config: UnseenGoldConfig) -> dict:
    if config.split not in ("dev", "train"):
        raise SystemExit(f"split must be 'dev' or 'train', got {config.split!r}")
    seen = training_gold([config.data_dir, *config.train_dirs])
    shares = {
        task: unseen_shares(
            os.path.join(config.data_dir, "retrieved", f"{task}-{config.split}.parquet"), seen, config.limit_per_task
        )
        for task in config.tasks
    }
    print(f"{'never a training gold':<24}" + "".join(f"{t[:8]:>9}" for t in config.tasks) + f"{'mean':>9}")
    for level in ("passage", "page"):
        values = [shares[t][level] for t in config.tasks]
        print(f"{f'  {level}':<24}" + "".join(f"{v:9.3f}" for v in values) + f"{sum(values) / len(values):9.3f}")
    write_report(config.output, shares)
    return shares


if __name__ == "__main__":
    main(parse_job_args(UnseenGoldConfig, __doc__.splitlines()[0], sys.argv[1:]))
