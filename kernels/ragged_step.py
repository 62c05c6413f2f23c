"""The fused ragged solver step: one launch advances every sample by one stage of its own coefficient table.

The generic update of ``indis.engine.core.solvers``, per sample ``b`` at stage
``s = step[b]`` of its own table::

    h      = conv_state * y + conv_raw * raw                  # raw output -> the solver's variable
    y'     = sum_i coef_y[i]     * (y, stash, h, H_1, ..., H_K)[i]
    stash' = sum_i coef_stash[i] * (y, stash, h, H_1, ..., H_K)[i]   (an all-zero row keeps the stash)
    H slot (s mod K) <- h                                       # ring buffer: H_j lives in slot (s - j) mod K

``PackedTable.rows`` holds these ``2 + 2 (3 + K)`` coefficients per sample and stage in float32, so the
kernel reads one row per sample, gathered by the device tensor ``step[B]``: the same
launch serves a plain loop (``step`` a broadcast stage index), a CUDA-graph replay and a continuous-batching
pool whose slots sit at different stages of different grids. A sample whose ``step`` is outside ``[0, S)``
(finished or idle) is neither read nor written. Inputs whose coefficient is exactly zero are not loaded (an
early stage never reads history slots nothing has written yet).

:func:`ragged_step_torch` is the readable reference of the kernel; :func:`ragged_step` dispatches (Triton on
CUDA, the optional C++ twin ``indis.kernels.native`` on CPU, the reference otherwise); :func:`bind_step` binds
the step to a sampling loop's buffers, validated once per loop. The custom op
``torch.ops.indis.ragged_step`` (declared to write ``y``, ``stash``, ``hist``) carries it through
``torch.compile`` (fake kernel: shape checks) and autograd (the reference's graph when an input needs grad).
Storage may be float32, float16 or bfloat16; arithmetic is always float32 (float64 storage: float64, torch
only). Updates are in place and safe: every element is read before it is written, by the same program.
``hist`` is ``[K, B, ...]`` and may be a slice ``pool[:, :B]`` of a larger slot pool (each slot contiguous);
the other tensors are contiguous ``[B, ...]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from indis.engine.core.solvers import SolverTable

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class PackedTable:
    """A solver table laid out for the fused step: ``rows[B, S, 2 + 2W]`` float32, ``W = 3 + history``.

    Row layout: ``[conv_state, conv_raw, coef_y[0:W], coef_stash[0:W]]`` over the inputs
    ``(y, stash, h, H_1..H_K)``. ``time`` ``[B, S]`` is the network's time input and ``in_scale`` ``[B, S]``
    the factor on the network input (None: 1), both in the state's dtype.
    """

    rows: Tensor
    time: Tensor
    in_scale: Tensor | None
    history: int
    uses_stash: bool

    @property
    def stages(self) -> int:
        return self.rows.shape[1]

    @property
    def width(self) -> int:
        return 3 + self.history


def pack_table(table: SolverTable, time: Tensor, dtype: torch.dtype) -> PackedTable:
    """Lay out ``table`` for the fused step (``time`` = the denoiser's time of ``table.sigma_eval``)."""
    coef_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    bsz, stages = table.conv.shape[:2]
    rows = torch.cat([table.conv, table.coef.reshape(bsz, stages, -1)], dim=-1).to(coef_dtype).contiguous()
    in_scale = table.in_scale.to(dtype) if table.scaled_input else None
    return PackedTable(rows, time.to(dtype), in_scale, table.history, table.uses_stash)


def _check(y: Tensor, raw: Tensor, stash: Tensor | None, hist: Tensor | None, table: PackedTable,
           step: Tensor) -> None:
    bsz = y.shape[0]
    if raw.shape != y.shape or raw.dtype != y.dtype or raw.device != y.device:
        raise ValueError(f"raw {tuple(raw.shape)} {raw.dtype} must match the state {tuple(y.shape)} "
                         f"{y.dtype}")
    if table.uses_stash and (stash is None or stash.shape != y.shape or stash.dtype != y.dtype):
        raise ValueError("this solver keeps a stash: pass stash shaped and typed like the state")
    if table.history and (hist is None or hist.shape != (table.history, *y.shape) or hist.dtype != y.dtype):
        raise ValueError(f"history must be [{table.history}, *state.shape] in the state's dtype, got "
                         f"{None if hist is None else tuple(hist.shape)}")
    if table.rows.shape[0] != bsz or table.rows.shape[-1] != 2 + 2 * table.width:
        raise ValueError(f"table rows {tuple(table.rows.shape)} do not fit a batch of {bsz}")
    if step.shape != (bsz,) or step.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"step must be an integer tensor [{bsz}], got {tuple(step.shape)} {step.dtype}")


def ragged_step_torch(y: Tensor, raw: Tensor, stash: Tensor | None, hist: Tensor | None, table: PackedTable,
                      step: Tensor, compute: torch.dtype | None = None) -> None:
    """Reference of the fused step (in place on ``y``, ``stash``, ``hist``): gather, combine, mask.

    Arithmetic in ``compute`` (default float32, float64 for float64 storage; the tests also run it in the
    storage dtype to measure torch's own low-precision error).
    """
    _check(y, raw, stash, hist, table, step)
    bsz, stages, width, k = y.shape[0], table.stages, table.width, table.history
    compute = compute or (torch.float64 if y.dtype == torch.float64 else torch.float32)
    active = (step >= 0) & (step < stages)
    s = step.clamp(0, stages - 1).long()
    row = table.rows[torch.arange(bsz, device=y.device), s].to(compute)          # [B, 2 + 2W]
    view = (bsz,) + (1,) * (y.ndim - 1)
    c = row.reshape(bsz, -1, *view[1:]).unbind(1)
    # Copies where y or stash would alias its compute view and autograd saves it for the coefficients' grads.
    copy = table.rows.requires_grad and torch.is_grad_enabled()
    y32, raw32 = y.to(compute, copy=copy), raw.to(compute)
    h = c[0] * y32 + c[1] * raw32
    slots = [(s + k - j) % k for j in range(1, k + 1)]                            # slot of H_j
    older = [hist[slot, torch.arange(bsz, device=y.device)].to(compute) for slot in slots]
    stash32 = stash.to(compute, copy=copy) if stash is not None else torch.zeros_like(y32)
    inputs = (y32, stash32, h, *older)

    def combine(first: int) -> Tensor:  # an input whose coefficient is 0 is never read (may be unwritten)
        return sum(torch.where(c[first + i] != 0, c[first + i] * v, 0.0) for i, v in enumerate(inputs))

    y_next = combine(2)
    keep = active.view(view)
    if table.uses_stash:
        stash_next = combine(2 + width)
        writes = (row[:, 2 + width:] != 0).any(-1) & active
        stash.copy_(torch.where(writes.view(view), stash_next, stash32).to(y.dtype))
    if k:
        newest = hist[s % k, torch.arange(bsz, device=y.device)]
        hist[s % k, torch.arange(bsz, device=y.device)] = torch.where(keep, h.to(y.dtype), newest)
    y.copy_(torch.where(keep, y_next, y32).to(y.dtype))


if triton is not None:

    @triton.jit
    def _ragged_step_kernel(y_ptr, raw_ptr, stash_ptr, hist_ptr, rows_ptr, step_ptr, step_stride, numel,
                            slot_stride, stages, HISTORY: tl.constexpr, USES_STASH: tl.constexpr,
                            BLOCK: tl.constexpr):
        # Masks are "offs < limit" with a per-program scalar limit: numel where the sample is active (and,
        # for an optional input, its coefficient is nonzero), else 0 -- nothing is read or written past it.
        W: tl.constexpr = 3 + HISTORY
        b = tl.program_id(1)
        s = tl.load(step_ptr + b * step_stride).to(tl.int32)
        limit = tl.where((s >= 0) & (s < stages), numel, 0)
        s = tl.minimum(tl.maximum(s, 0), stages - 1)
        row = rows_ptr + (b * stages + s).to(tl.int64) * (2 + 2 * W)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < limit
        base = b.to(tl.int64) * numel
        y = tl.load(y_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        raw = tl.load(raw_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(row) * y + tl.load(row + 1) * raw
        acc = tl.load(row + 2) * y + tl.load(row + 4) * h
        if USES_STASH:
            acc_s = tl.load(row + 2 + W) * y + tl.load(row + 4 + W) * h
            cy, cs = tl.load(row + 3), tl.load(row + 3 + W)
            read = offs < tl.where((cy != 0) | (cs != 0), limit, 0)
            old = tl.load(stash_ptr + base + offs, mask=read, other=0.0).to(tl.float32)
            acc += cy * old
            acc_s += cs * old
            written = tl.abs(tl.load(row + 2 + W)) + tl.abs(cs) + tl.abs(tl.load(row + 4 + W))
        for j in tl.static_range(1, HISTORY + 1):
            cy = tl.load(row + 4 + j)
            slot = ((s + HISTORY - j) % HISTORY).to(tl.int64)
            if USES_STASH:
                cs = tl.load(row + 4 + j + W)
                read = offs < tl.where((cy != 0) | (cs != 0), limit, 0)
                hj = tl.load(hist_ptr + slot * slot_stride + base + offs, mask=read, other=0.0).to(tl.float32)
                acc_s += cs * hj
                written += tl.abs(cs)
            else:
                read = offs < tl.where(cy != 0, limit, 0)
                hj = tl.load(hist_ptr + slot * slot_stride + base + offs, mask=read, other=0.0).to(tl.float32)
            acc += cy * hj
        tl.store(y_ptr + base + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
        if USES_STASH:  # an all-zero stash row keeps the stash
            tl.store(stash_ptr + base + offs, acc_s.to(stash_ptr.dtype.element_ty),
                     mask=offs < tl.where(written != 0, limit, 0))
        if HISTORY > 0:
            slot = (s % HISTORY).to(tl.int64)
            tl.store(hist_ptr + slot * slot_stride + base + offs, h.to(hist_ptr.dtype.element_ty), mask=mask)


def launch_config(numel: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for one sample of ``numel`` elements: up to 2048 elements per program."""
    block = min(2048, triton.next_power_of_2(max(numel, 16)))
    return block, (8 if block >= 2048 else 4)


def _triton_launch(y: Tensor, raw: Tensor, stash: Tensor | None, hist: Tensor | None, table: PackedTable,
                   step: Tensor, block: int | None, num_warps: int | None) -> tuple[tuple, tuple, dict]:
    """Validate a Triton step's tensors: (its grid, the kernel's arguments in order, its meta-parameters)."""
    if triton is None:
        raise RuntimeError("the triton backend needs the `triton` package")
    _check(y, raw, stash, hist, table, step)
    if y.dtype not in STORAGE_DTYPES:
        raise ValueError(f"the triton step stores float32/float16/bfloat16, not {y.dtype}")
    slot = None if hist is None else hist[0]
    for name, t in (("state", y), ("raw", raw), ("stash", stash), ("history slot", slot)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the triton step")
    bsz, numel = y.shape[0], y[0].numel()
    default_block, default_warps = launch_config(numel)
    block, num_warps = block or default_block, num_warps or default_warps
    args = (y, raw, y if stash is None else stash, y if hist is None else hist, table.rows, step,
            step.stride(0), numel, 0 if hist is None else hist.stride(0), table.stages)
    meta = {"HISTORY": table.history, "USES_STASH": table.uses_stash, "BLOCK": block, "num_warps": num_warps}
    return (triton.cdiv(numel, block), bsz), args, meta


def ragged_step_triton(y: Tensor, raw: Tensor, stash: Tensor | None, hist: Tensor | None, table: PackedTable,
                       step: Tensor, block: int | None = None, num_warps: int | None = None) -> None:
    """The fused step as one Triton launch over ``(cdiv(numel, BLOCK), B)`` programs (in place)."""
    grid, args, meta = _triton_launch(y, raw, stash, hist, table, step, block, num_warps)
    _ragged_step_kernel[grid](*args, **meta)


class _BoundStep:
    """A sampling loop's fused step over its fixed buffers (state ``y``, ``stash``, history ``hist``,
    ``table``), validated once: ``step(raw, k)`` advances every sample by stage ``k`` of the loop's int
    ``stages`` tensor (its arange), checking only the denoiser output ``raw`` per call. A ``raw`` that
    requires grad (with grad mode on) goes through :func:`ragged_step`, which records the autograd graph. The
    buffers must not be reallocated while it is used. Subclasses set ``backend`` and launch in ``_launch``."""

    backend: str

    def __init__(self, y: Tensor, stash: Tensor | None, hist: Tensor | None, table: PackedTable,
                 stages: Tensor) -> None:
        if stages.dim() != 1 or not stages.is_contiguous() or stages.device != y.device:
            raise ValueError("stages must be a contiguous 1-d integer tensor on the state's device")
        self.y, self.stash, self.hist, self.table, self.stages = y, stash, hist, table, stages

    def __call__(self, raw: Tensor, k: int) -> None:
        y = self.y
        if raw.shape != y.shape or raw.dtype != y.dtype or raw.device != y.device or not raw.is_contiguous():
            raise ValueError(f"raw {tuple(raw.shape)} {raw.dtype} on {raw.device} must be a contiguous "
                             f"tensor shaped and typed like the state {tuple(y.shape)} {y.dtype} on "
                             f"{y.device}")
        if not 0 <= k < self.stages.shape[0]:
            raise ValueError(f"stage {k} is not in [0, {self.stages.shape[0]})")
        if raw.requires_grad and torch.is_grad_enabled():
            step = self.stages[k].expand(y.shape[0])
            ragged_step(y, raw, self.stash, self.hist, self.table, step, self.backend)
            return
        self._launch(raw, k)

    def _launch(self, raw: Tensor, k: int) -> None:
        raise NotImplementedError


class TritonBoundStep(_BoundStep):
    """:func:`ragged_step_triton` bound to a sampling loop's buffers (see :class:`_BoundStep`); the Triton
    twin of ``native.BoundStep``."""

    backend = "triton"

    def __init__(self, y: Tensor, stash: Tensor | None, hist: Tensor | None, table: PackedTable,
                 stages: Tensor) -> None:
        super().__init__(y, stash, hist, table, stages)
        self._grid, args, self._meta = _triton_launch(y, y, stash, hist, table, stages[0].expand(y.shape[0]),
                                                      None, None)
        self._mid, self._tail = args[2:5], (0, *args[7:])  # step stride 0: one stage for every sample

    def _launch(self, raw: Tensor, k: int) -> None:
        _ragged_step_kernel[self._grid](self.y, raw, *self._mid, self.stages[k], *self._tail, **self._meta)


BACKENDS = ("triton", "native", "torch")


def backend_for(device: torch.device, requested: str | None = None) -> str:
    """The step backend for ``device``: ``requested`` (triton|native|torch) when given, else
    ``INDIS_KERNELS`` if set, else triton on CUDA, the C++ extension on CPU where it is built
    (``indis.kernels.native``), torch elsewhere. An unknown name, or a backend that cannot run on ``device``,
    is an error naming what is missing -- never a silent switch to another backend.

    The triton backend on a CPU tensor needs ``TRITON_INTERPRET=1`` (set before triton kernels are defined):
    that is how the tests run the kernel without a GPU.
    """
    from indis.kernels import native

    where = "backend" if requested is not None else "INDIS_KERNELS"
    choice = os.environ.get("INDIS_KERNELS", "") if requested is None else requested
    choice = choice.strip().lower() if isinstance(choice, str) else choice
    if requested is None and not choice:  # nothing asked for: the device's default
        if device.type == "cuda":
            return "triton" if triton is not None else "torch"
        return "native" if device.type == "cpu" and native.available() else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"{where}={choice!r}: choose one of {BACKENDS}")
    if choice == "triton":
        if triton is None:
            raise RuntimeError(f"{where}=triton but the `triton` package is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"{where}=triton on {device.type}: Triton runs on CUDA devices (or in its "
                               f"interpreter: set TRITON_INTERPRET=1 before importing indis); use "
                               f"backend='torch' or 'native' here")
    if choice == "native":
        if device.type != "cpu":
            raise RuntimeError(f"{where}=native: the C++ step runs on CPU tensors, not {device.type}")
        if not native.available():
            raise RuntimeError(f"{where}=native: {native.REASON}")
    return choice


def fused(backend: str, dtype: torch.dtype) -> bool:
    """Whether ``backend`` has a fused step for this storage dtype (else the torch reference serves)."""
    return (backend == "triton" and dtype in STORAGE_DTYPES) or (backend == "native" and dtype in (
        torch.float32, torch.float64))


def _dispatch(y: Tensor, raw: Tensor, stash: Tensor | None, hist: Tensor | None, table: PackedTable,
              step: Tensor, backend: str) -> None:
    if not fused(backend, y.dtype):
        ragged_step_torch(y, raw, stash, hist, table, step)
    elif backend == "triton":
        ragged_step_triton(y, raw, stash, hist, table, step)
    else:
        from indis.kernels.native import ragged_step_native

        ragged_step_native(y, raw, stash, hist, table, step)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def ragged_step(y: Tensor, raw: Tensor, stash: Tensor | None, hist: Tensor | None, table: PackedTable,
                step: Tensor, backend: str | None = None) -> None:
    """Advance each sample by one stage of its own table (in place); see the module docstring.

    Eager calls that need no gradient go straight to the backend; under ``torch.compile`` and when an input
    requires grad the call goes through the custom op ``torch.ops.indis.ragged_step`` (which the compiler
    traces without a graph break and autograd differentiates). The op's Python dispatch (autograd, version
    bump and backend kernels) costs ~135 us more per call on CPU -- measured with B=16, [16, 1, 8, 8] float32,
    UniPC bh2: native 26-32 us direct vs ~160 us through the op -- hence the direct call; the routing test
    costs ~0.7 us.
    """
    if backend not in BACKENDS:  # None or a name to check; a valid name costs nothing more here
        backend = backend_for(y.device, backend)
    if torch.compiler.is_compiling() or torch.is_grad_enabled() and (  # inline: ~0.7 us in all
            y.requires_grad or raw.requires_grad or table.rows.requires_grad
            or (stash is not None and stash.requires_grad) or (hist is not None and hist.requires_grad)):
        torch.ops.indis.ragged_step(y, raw, stash, hist, table.rows, step, table.history, table.uses_stash,
                                    backend)
    else:
        _dispatch(y, raw, stash, hist, table, step, backend)


def bind_step(y: Tensor, stash: Tensor | None, hist: Tensor | None, table: PackedTable, stages: Tensor,
              backend: str | None = None) -> Callable[[Tensor, int], None]:
    """A sampling loop's step over its fixed buffers: ``step(raw, k)`` advances every sample by stage ``k``
    of ``stages`` (the loop's int arange), as ``ragged_step(y, raw, stash, hist, table, stages[k].expand(B),
    backend)``. The Triton and C++ steps outside ``torch.compile`` and autograd are validated once
    (:class:`TritonBoundStep`, ``native.BoundStep``: each call checks only ``raw``); every other case calls
    :func:`ragged_step`."""
    backend = backend_for(y.device, backend)
    if (backend in ("triton", "native") and fused(backend, y.dtype) and not torch.compiler.is_compiling()
            and not _needs_grad(y, stash, hist, table.rows)):
        if backend == "triton":
            return TritonBoundStep(y, stash, hist, table, stages)
        from indis.kernels.native import BoundStep

        return BoundStep(y, stash, hist, table, stages)
    bsz = y.shape[0]
    return lambda raw, k: ragged_step(y, raw, stash, hist, table, stages[k].expand(bsz), backend)


def _op_table(rows: Tensor, history: int, uses_stash: bool) -> PackedTable:
    return PackedTable(rows, rows, None, history, uses_stash)  # the step reads neither time nor in_scale


@torch.library.custom_op("indis::ragged_step", mutates_args=("y", "stash", "hist"))
def ragged_step_op(y: Tensor, raw: Tensor, stash: Tensor | None, hist: Tensor | None, rows: Tensor,
                   step: Tensor, history: int, uses_stash: bool, backend: str) -> None:
    """:func:`ragged_step` as a custom op over the fields of a :class:`PackedTable` (``rows``, ``history``,
    ``uses_stash``); ``backend`` one of :data:`BACKENDS` or "" for the device's default. Writes ``y`` and,
    where the table uses them, ``stash`` and ``hist`` (declared mutated, so the compiler functionalizes it).
    """
    if backend not in BACKENDS:
        backend = backend_for(y.device, backend or None)
    _dispatch(y, raw, stash, hist, _op_table(rows, history, uses_stash), step, backend)


@ragged_step_op.register_fake
def _ragged_step_fake(y: Tensor, raw: Tensor, stash: Tensor | None, hist: Tensor | None, rows: Tensor,
                      step: Tensor, history: int, uses_stash: bool, backend: str) -> None:
    _check(y, raw, stash, hist, _op_table(rows, history, uses_stash), step)  # shapes only; writes in place


def _ragged_step_autograd(keyset: torch._C.DispatchKeySet, y: Tensor, raw: Tensor, stash: Tensor | None,
                          hist: Tensor | None, rows: Tensor, step: Tensor, history: int, uses_stash: bool,
                          backend: str) -> None:
    """Autograd kernel of the op. The step is linear in ``y``, ``raw``, ``stash``, ``hist`` (and in each
    coefficient of ``rows``): when an input requires grad it runs as :func:`ragged_step_torch`, whose in-place
    aten ops autograd records (the backward is that of the same gather / combine / mask), on any backend;
    otherwise it runs the backend below autograd, as ``custom_op`` does.
    """
    if _needs_grad(y, raw, stash, hist, rows):
        ragged_step_torch(y, raw, stash, hist, _op_table(rows, history, uses_stash), step)
        return
    with torch._C._AutoDispatchBelowAutograd():
        below = keyset & torch._C._after_autograd_keyset
        torch.ops.indis.ragged_step.default.redispatch(below, y, raw, stash, hist, rows, step, history,
                                                       uses_stash, backend)


# custom_op refuses an autograd formula for an op that mutates its inputs (and its default autograd kernel
# would leave the written buffers' graphs untouched: silently wrong gradients), so this replaces it.
_LIB = torch.library.Library("indis", "FRAGMENT")
_LIB.impl("ragged_step", _ragged_step_autograd, "Autograd", with_keyset=True)
