"""The checks a contributor runs before review, enforced by the test command: ruff (lint and format) and mypy on
the product package and the bench lab."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("check", [["ruff", "check", "disagg", "bench"], ["ruff", "format", "--check", "disagg", "bench"],
                                   ["mypy"]], ids=["ruff-lint", "ruff-format", "mypy"])
def test_static_checks_pass(check):
    out = subprocess.run([sys.executable, "-m", *check], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(check)} failed:\n{out.stdout[-6000:]}\n{out.stderr[-2000:]}"
