"""Which checkpoint a training run exports (`checkpoint.export`)."""

from __future__ import annotations

import pytest
from ray.train import Checkpoint

from glimmer_ray.train.config import CheckpointSection, TrainConfig
from glimmer_ray.train.run import best_checkpoint


def _checkpoints(tmp_path, names: list[str]) -> list[Checkpoint]:
    made = []
    for name in names:
        (tmp_path / name).mkdir()
        made.append(Checkpoint.from_directory(str(tmp_path / name)))
    return made


def test_best_checkpoint_follows_the_score_order_and_takes_the_newest_on_a_tie(tmp_path):
    early, middle, late = _checkpoints(
        tmp_path, ["checkpoint_2026-12-06_10", "checkpoint_2026-12-06_11", "checkpoint_2026-12-06_12"]
    )
    kept = [
        (middle, {"dev_em": 0.4, "step": 1000}),
        (early, {"dev_em": 0.3, "step": 500}),
        (late, {"dev_em": 0.4, "step": 1500}),
    ]
    chosen, metrics = best_checkpoint(kept, CheckpointSection(score_attribute="dev_em", score_order="max"), late)
    assert chosen.path == late.path and metrics["step"] == 1500  # 0.4 twice: the newer
    chosen, metrics = best_checkpoint(kept, CheckpointSection(score_attribute="dev_em", score_order="min"), late)
    assert chosen.path == early.path and metrics["dev_em"] == 0.3
    # no kept checkpoint reports the attribute (a run that never evaluated): the last one
    chosen, metrics = best_checkpoint(kept, CheckpointSection(score_attribute="dev_f1"), late)
    assert chosen.path == late.path and metrics == {}


@pytest.mark.parametrize(
    ("field", "value", "message"), [("export", "first", "checkpoint.export"), ("score_order", "up", "score_order")]
)
def test_bad_checkpoint_choices_are_refused(field, value, message):
    config = TrainConfig()
    setattr(config.checkpoint, field, value)
    with pytest.raises(ValueError, match=message):
        config.validate()
