"""NVTX ranges: cached per name, usable as context managers, switched off by INDIS_NVTX=0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from indis.engine.core import profiling


def test_ranges_are_cached_and_nest() -> None:
    pytest.importorskip("nvtx")
    assert profiling.enabled()
    outer = profiling.nvtx_range("test outer")
    assert profiling.nvtx_range("test outer") is outer
    with outer, profiling.nvtx_range("test inner"):
        pass


def test_indis_nvtx_zero_disables_ranges() -> None:
    code = "from indis.engine.core import profiling as p; " \
           "r = p.nvtx_range('x'); r.__enter__(); r.__exit__(); " \
           "print(p.enabled())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "INDIS_NVTX": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
