"""tests/tools.py itself: a missing tool fails the test in CI and skips it elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NEEDS_A_TOOL = """
from tests.tools import missing_tool


def test_needs_a_tool():
    missing_tool("frobnicate", why="nothing can be frobnicated", how="install frobnicate")
"""


@pytest.mark.parametrize(("ci", "outcome"), [("true", "1 failed"), ("", "1 skipped"), ("false", "1 skipped")])
def test_missing_tool_fails_in_ci_and_skips_elsewhere(tmp_path: Path, ci: str, outcome: str) -> None:
    (tmp_path / "test_needs_a_tool.py").write_text(NEEDS_A_TOOL)
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert outcome in result.stdout, result.stdout + result.stderr
    assert "frobnicate is missing: nothing can be frobnicated; install frobnicate" in result.stdout
