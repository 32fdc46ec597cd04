"""What a test does when a tool it needs is missing: skip loudly on a developer's machine, fail in CI.

CI sets ``CI=true``; there a missing tool is a broken machine setup (``make system-deps`` installs every
tool the tests use), so the run fails with the tool's name instead of going green without the test.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest


def in_ci() -> bool:
    """True when the tests run in CI (``CI`` set to anything but empty, ``0`` or ``false``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_tool(tool: str, *, why: str, how: str) -> None:
    """Stop the test because ``tool`` is missing: ``pytest.fail`` in CI, a loud ``pytest.skip`` elsewhere."""
    message = f"{tool} is missing: {why}; {how}"
    if in_ci():
        pytest.fail(f"CI needs {message}", pytrace=False)
    print(f"\n*** SKIPPED: {message} ***", file=sys.stderr, flush=True)
    warnings.warn(f"SKIPPED: {message}", UserWarning, stacklevel=2)
    pytest.skip(message)
