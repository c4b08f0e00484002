"""The job configuration loader: YAML + dotted overrides, unknown keys and wrong types are errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from glimmer_ray.config import ConfigError, load_config, parse_job_args


@dataclass
class Inner:
    width: int = 32
    rate: float = 0.1
    name: str | None = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    flag: bool = False


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("inner:\n  width: 64\nsizes: [3]\n")
    config = load_config(Outer, path, ["inner.rate=0.5", "flag=true", "inner.name=null"])
    assert config == Outer(inner=Inner(width=64, rate=0.5, name=None), sizes=[3], flag=True)


def test_ints_are_accepted_as_floats_but_not_the_reverse():
    assert load_config(Outer, None, ["inner.rate=1"]).inner.rate == 1.0
    with pytest.raises(ConfigError, match=r"inner.width: expected an integer, got 0.5"):
        load_config(Outer, None, ["inner.width=0.5"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inner.depth=3"], r"unknown key inner.depth; allowed keys here: name, rate, width"),
        (["outer=3"], r"unknown key outer"),
        (["flag=yes please"], r"flag: expected true or false"),
        (["sizes=3"], r"sizes: expected a list"),
        (["inner=3"], r"inner: expected a mapping"),
        (["no_equals_sign"], r"not of the form key.path=value"),
    ],
)
def test_bad_overrides_raise(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, overrides)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, path)


def test_command_line_errors_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_job_args(Outer, "test", ["inner.bogus=1"])
    assert exit_info.value.code == 2
    assert "unknown key inner.bogus" in capsys.readouterr().err
    assert parse_job_args(Outer, "test", ["inner.width=8"]).inner.width == 8


@dataclass
class WithOutput:
    output_dir: str = "outputs/default"
    steps: int = 1


def test_output_dir_flag_is_the_output_dir_override(capsys):
    assert parse_job_args(WithOutput, "test", ["--output-dir", "runs/a", "steps=3"]) == WithOutput("runs/a", 3)
    assert parse_job_args(WithOutput, "test", ["--config", "/dev/null", "output_dir=runs/b"]).output_dir == "runs/b"
    with pytest.raises(SystemExit) as exit_info:
        parse_job_args(WithOutput, "test", ["--output-dir", "runs/a", "output_dir=runs/b"])
    assert exit_info.value.code == 2 and "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a job without output_dir has no such flag
        parse_job_args(Outer, "test", ["--output-dir", "runs/a"])
    assert "unrecognized arguments: --output-dir" in capsys.readouterr().err
