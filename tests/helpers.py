"""Helpers shared by the tests: where the real data is, and how to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TIMFUSION_SHARED", REPO.parent / "shared"))


def need_shared(*parts: str) -> Path:
    """The path under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (set TIMFUSION_SHARED to the shared data folder)")
    return path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real console script in a subprocess (exit codes, stderr, no state leaks)."""
    exe = Path(sys.executable).parent / "timfusion"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=600)
