"""Plain ``pytest`` from the repository root collects what ``python -m pytest`` does (the shared helpers
are imported as ``tests.*``, which needs the root on the path: ``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_pytest_collects_modules_that_import_shared_helpers() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pytest = Path(sys.executable).with_name("pytest")
    modules = ["tests/engine/core/test_graphs.py", "tests/kernels/test_ragged_step.py"]  # both import tests.*
    out = subprocess.run([str(pytest), "--collect-only", "-q", "-p", "no:cacheprovider", *modules], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "error" not in out.stdout.lower().splitlines()[-1]
