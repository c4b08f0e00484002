"""Every YAML the repository ships loads and validates against the dataclass of the job it configures."""

from __future__ import annotations

import pathlib
import re

import pytest

from glimmer_ray.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
JOB_CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml")) + sorted(
    (ROOT / "jobs" / "dev" / "configs").glob("*.yaml")
)


def _config_class(module):
    # the job's top-level config is the class its `main` takes
    annotation = module.main.__annotations__["config"]
    return vars(module)[annotation] if isinstance(annotation, str) else annotation


def test_there_are_job_configs():
    assert JOB_CONFIGS, "jobs/configs/ holds no YAML"


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda path: str(path.relative_to(ROOT / "jobs")))
def test_job_yaml_loads_and_names_its_command(path, load_job):
    header = path.read_text().splitlines()[0]
    match = re.search(r"python jobs/(\S+)\.py --config (jobs/\S+\.yaml)", header)
    assert match, f"{path.name}: the first line must give the command that runs it"
    assert ROOT / match.group(2) == path and (ROOT / "jobs" / f"{match.group(1)}.py").exists()
    config = load_config(_config_class(load_job(match.group(1))), path)
    if hasattr(config, "validate"):
        config.validate()  # cross-field checks, e.g. m <= k


def test_jobs_never_import_jobs():
    """Jobs are recipes: what two of them share lives in the library (torchtune's rule for recipes/)."""
    offenders = []
    for script in sorted((ROOT / "jobs").rglob("*.py")):
        text = script.read_text()
        if re.search(
            r"sys\.path\.(append|insert)|importlib|spec_from_file_location|^\s*import (?!\S*\.)\w+\s*#\s*noqa",
            text,
            re.M,
        ):
            offenders.append(str(script.relative_to(ROOT)))
        siblings = {path.stem for path in (ROOT / "jobs").rglob("*.py")}
        imported = set(re.findall(r"^\s*(?:from|import) (\w+)", text, re.M))
        offenders += [f"{script.relative_to(ROOT)} imports {name}" for name in sorted(imported & siblings)]
    assert not offenders, offenders
