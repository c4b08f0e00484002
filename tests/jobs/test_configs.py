"""Every YAML the repository ships loads and validates against the dataclass of the job it configures."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys

import pytest

from glimmer_ray.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
JOB_CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))


def _job_module(script: pathlib.Path):
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _config_class(module):
    # the job's top-level config is the class its `main` takes
    annotation = module.main.__annotations__["config"]
    return vars(module)[annotation] if isinstance(annotation, str) else annotation


def test_there_are_job_configs():
    assert JOB_CONFIGS, "jobs/configs/ holds no YAML"


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda path: path.name)
def test_job_yaml_loads_and_names_its_command(path):
    header = path.read_text().splitlines()[0]
    match = re.search(r"python (jobs/\S+\.py) --config (jobs/configs/\S+\.yaml)", header)
    assert match, f"{path.name}: the first line must give the command that runs it"
    script, config_path = ROOT / match.group(1), ROOT / match.group(2)
    assert config_path == path and script.exists()
    module = _job_module(script)
    config = load_config(_config_class(module), path)
    if hasattr(config, "validate"):
        config.validate()  # cross-field checks, e.g. m <= k
