"""Test configuration: CPU only, Triton interpreter for kernels, deterministic float64 helpers."""

import os

# Must be set before any @triton.jit function is defined (kernels run interpreted on CPU).
os.environ.setdefault("TRITON_INTERPRET", "1")
