"""indis.kernels: the fused Triton ragged solver step and its torch reference.

``ragged_step`` advances every sample of a batch by one stage of its own coefficient table (gathered by the
device tensor ``step[B]``); ``backend_for`` picks Triton on CUDA, the optional C++ extension on CPU where it
is built, torch elsewhere (``INDIS_KERNELS`` overrides; ``TRITON_INTERPRET=1`` runs the Triton kernel on CPU).
"""

from indis.kernels.ragged_step import (
    BACKENDS,
    PackedTable,
    backend_for,
    pack_table,
    ragged_step,
    ragged_step_torch,
    ragged_step_triton,
)

__all__ = ["BACKENDS", "PackedTable", "backend_for", "pack_table", "ragged_step", "ragged_step_torch",
           "ragged_step_triton"]
