"""The tree is formatted by `ruff format` (line length 120, pyproject.toml) and `ruff check` finds nothing."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    beside = pathlib.Path(sys.executable).with_name("ruff")  # the venv's, installed with the test extra
    found = str(beside) if beside.exists() else shutil.which("ruff")
    if not found:
        pytest.fail("ruff is not installed: pip install -c constraints.txt -e '.[test]'")
    return [found]


@pytest.mark.parametrize("command", [["format", "--check", "--diff"], ["check"]], ids=["format", "check"])
def test_ruff_is_clean(command):
    result = subprocess.run(_ruff() + command + ["."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
