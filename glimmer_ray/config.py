"""Job configuration: one nested dataclass per job, loaded from YAML, overridden by dotted flags.

    python jobs/benchmark_inference.py --config jobs/configs/benchmark_inference.yaml model.d_model=256

Unknown keys, in the YAML or on the command line, are errors that name the key and list the
allowed ones; values are checked against the dataclass field types.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A job configuration that does not fit its dataclass."""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return [_coerce(entry, item, f"{where}[{index}]") for index, entry in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(value, annotation):
        return value
    raise ConfigError(f"{where}: expected {annotation}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and ill-typed values raise `ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed keys here: {', '.join(sorted(fields))}")
    values = {}
    for name, value in data.items():
        values[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"{where or cls.__name__}: {error}") from error


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML: 0.5, true, null, [1, 2]) to a nested dict."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key.path=value")
        key, raw = override.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Load dataclass `cls` from a YAML file (optional) plus dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    return from_dict(cls, apply_overrides(data, list(overrides or [])))


def parse_job_args(cls: type[T], description: str, argv: list[str] | None = None) -> T:
    """`--config FILE` plus `key.path=value` overrides, as every job script takes them; a job whose config has a
    top-level `output_dir` also takes `--output-dir DIR`, the same as the override `output_dir=DIR`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file of the job's configuration (defaults apply when omitted)")
    has_output_dir = "output_dir" in {item.name for item in dataclasses.fields(cls)}
    if has_output_dir:
        parser.add_argument("--output-dir", help="where the job writes its artifacts (the same as output_dir=DIR)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.d_model=128")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if has_output_dir and args.output_dir is not None:
        if any(item.split("=", 1)[0] == "output_dir" for item in overrides):
            parser.error("give the output directory once: --output-dir DIR or output_dir=DIR, not both")
        overrides.append(f"output_dir={args.output_dir}")
    try:
        return load_config(cls, args.config, overrides)
    except ConfigError as error:
        parser.error(str(error))
