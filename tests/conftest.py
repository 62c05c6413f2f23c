"""Test configuration: CPU only, Triton interpreter for kernels, deterministic float64 helpers."""

import os
import sys
from pathlib import Path

# Must be set before any @triton.jit function is defined (kernels run interpreted on CPU).
os.environ.setdefault("TRITON_INTERPRET", "1")

# The repository root is on sys.path so that tests import `tests.*` (pytest's pythonpath; `python -m` adds
# the working directory). At the head of the path its folders would shadow installed top-level packages of
# the same names -- transformers imports Hugging Face's `kernels` package, which the repository's kernels/
# folder would hide -- so the root goes last.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT] + [str(_ROOT)]
