"""Loader of the optional C++ extension ``indis_native``: the CPU twin of the fused ragged step.

:func:`ragged_step_native` has the semantics of :func:`indis.kernels.ragged_step.ragged_step_torch` (same
float32 results: the C++ sums in the reference's order without fused multiply-adds) in one pass over each
sample, threaded over samples and chunks. Storage is float32 (or float64, computed in float64) on the CPU.
:class:`BoundStep` is that step bound to a sampling loop's buffers, validated once per loop.
:func:`ragged_step_advance_native` also does a continuous batcher's per-iteration bookkeeping in the same
call (each sample's stage counter and finished flag); :func:`ragged_step_advance_torch` is its torch twin.
:class:`SlotStepper` (that call over a slot pool's buffers, validated once, with the pool's other per-slot
reads: each slot's network time at its stage, and a retirement's copies of states with their finiteness) and
:class:`SlotCompactor` (a batcher's surviving slots to the front of all its per-slot buffers and the freed
slots reset to a free slot's values, in one C++ call, or a torch gather and fill per buffer) are what a slot
pool calls; :func:`pool_kernels` is the one place they are chosen (C++ or torch, from the device, backend
and dtype).
The extension is built by ``.ci/build_native.sh`` (``pip install --no-build-isolation ./kernels/csrc``);
without it :func:`available` is False, :data:`REASON` says why, and nothing else in indis changes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from indis.kernels.ragged_step import PackedTable, _BoundStep, _check, fused, ragged_step_torch

API_VERSION = 5  # must equal indis_native.API_VERSION (the argument lists of its functions)
NATIVE_DTYPES = (torch.float32, torch.float64)


def _load() -> tuple[object | None, str]:
    try:
        import indis_native
    except ImportError as e:
        return None, (f"the C++ extension indis_native is not installed ({e}); build it with "
                      ".ci/build_native.sh (needs a C++ compiler and cmake)")
    version = getattr(indis_native, "API_VERSION", None)
    if version != API_VERSION:
        return None, (f"indis_native at {indis_native.__file__} has API version {version}, this indis needs "
                      f"{API_VERSION}: rebuild it with .ci/build_native.sh")
    return indis_native, ""


_native, REASON = _load()


def available() -> bool:
    """Whether the C++ extension is importable (else :data:`REASON` says why)."""
    return _native is not None


def _native_args(y: Tensor, raw: Tensor, stash: Tensor | None, hist: Tensor | None, table: PackedTable,
                 step: Tensor, threads: int | None) -> tuple[Tensor, tuple]:
    """Validate a native step's tensors: (the rows the addresses point into, which the caller keeps alive
    during the call, and the arguments of ``indis_native.ragged_step`` in its order)."""
    if _native is None:
        raise RuntimeError(REASON)
    _check(y, raw, stash, hist, table, step)
    stash = stash if table.uses_stash else None  # neither is read unless the table uses it
    hist = hist if table.history else None
    if y.dtype not in NATIVE_DTYPES:
        raise ValueError(f"the native step stores float32 or float64, not {y.dtype}")
    for name, t in (("state", y), ("raw", raw), ("stash", stash), ("history", hist), ("step", step),
                    ("table rows", table.rows)):
        if t is not None and not t.is_cpu:
            raise ValueError(f"the native step runs on CPU tensors; {name} is on {t.device}")
    for name, t in (("state", y), ("raw", raw), ("stash", stash), ("history slot", hist)):
        if t is not None and not (t[0] if t is hist else t).is_contiguous():
            raise ValueError(f"{name} must be contiguous for the native step")
    rows = table.rows  # float32 rows for float32 storage, float64 for float64 (pack_table's own)
    if rows.dtype != y.dtype or not rows.is_contiguous():
        rows = rows.to(y.dtype).contiguous()
    threads = torch.get_num_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return rows, (y.data_ptr(), raw.data_ptr(), 0 if stash is None else stash.data_ptr(),
                  0 if hist is None else hist.data_ptr(), rows.data_ptr(), step.data_ptr(),
                  8 * step.element_size(), step.stride(0), y.shape[0], math.prod(y.shape[1:]),
                  0 if hist is None else hist.stride(0), table.stages, table.history, table.uses_stash,
                  8 * y.element_size(), threads)


def _check_advance(y: Tensor, step: Tensor, stages: Tensor, done: Tensor, n_active: int) -> None:
    bsz = y.shape[0]
    if stages.shape != (bsz,) or stages.dtype != torch.int64:
        raise ValueError(f"stages must be an int64 tensor [{bsz}], got {tuple(stages.shape)} {stages.dtype}")
    if done.shape != (bsz,) or done.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"done must be a bool or uint8 tensor [{bsz}], got {tuple(done.shape)} {done.dtype}")
    for name, t in (("step", step), ("stages", stages), ("done", done)):
        if t.device != step.device or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, on the step's device (advanced in place)")
    if not 0 <= n_active <= bsz:
        raise ValueError(f"n_active must be in [0, {bsz}], got {n_active}")


def ragged_step_native(y: Tensor, raw: Tensor, stash: Tensor | None, hist: Tensor | None, table: PackedTable,
                       step: Tensor, threads: int | None = None) -> None:
    """The fused step in C++ on CPU tensors, in place (``threads``: ``torch.get_num_threads()`` if None)."""
    # Raises first without the extension; `rows` (maybe a converted copy) stays alive through the call.
    rows, args = _native_args(y, raw, stash, hist, table, step, threads)
    # Positional, in the order of indis_native.ragged_step's signature (keywords cost ~1 us per call).
    _native.ragged_step(*args)


class BoundStep(_BoundStep):
    """:func:`ragged_step_native` bound to a sampling loop's buffers (see
    :class:`~indis.kernels.ragged_step._BoundStep`; ``threads``: fixed here, ``torch.get_num_threads()`` if
    None)."""

    backend = "native"

    def __init__(self, y: Tensor, stash: Tensor | None, hist: Tensor | None, table: PackedTable,
                 stages: Tensor, threads: int | None = None) -> None:
        super().__init__(y, stash, hist, table, stages)
        self._rows, args = _native_args(y, y, stash, hist, table, stages[0].expand(y.shape[0]), threads)
        self._head, self._mid, self._tail = args[0], args[2:5], args[6:]
        self._step_bytes = stages.element_size()

    def _launch(self, raw: Tensor, k: int) -> None:
        step = self.stages.data_ptr() + k * self._step_bytes  # stages[k] for every sample (stride 0)
        _native.ragged_step(self._head, raw.data_ptr(), *self._mid, step, *self._tail)


def ragged_step_advance_native(y: Tensor, raw: Tensor, stash: Tensor | None, hist: Tensor | None,
                               table: PackedTable, step: Tensor, stages: Tensor, done: Tensor, n_active: int,
                               threads: int | None = None) -> int:
    """:func:`ragged_step_native`, then in the same C++ call each of the first ``n_active`` samples whose
    ``step`` is in ``[0, stages[b])`` advances by one (``stages``: int64 ``[B]``, each sample's own stage
    count) and ``done[b]`` (bool or uint8 ``[B]``) says whether it reached ``stages[b]`` now; returns how
    many did."""
    rows, args = _native_args(y, raw, stash, hist, table, step, threads)  # rows: alive through the call
    _check_advance(y, step, stages, done, n_active)
    return _native.ragged_step_advance(*args, stages.data_ptr(), done.data_ptr(), n_active)


def ragged_step_advance_torch(y: Tensor, raw: Tensor, stash: Tensor | None, hist: Tensor | None,
                              table: PackedTable, step: Tensor, stages: Tensor, done: Tensor,
                              n_active: int) -> int:
    """:func:`ragged_step_advance_native` in torch ops (the same results on any device)."""
    _check_advance(y, step, stages, done, n_active)
    ragged_step_torch(y, raw, stash, hist, table, step)
    live, counts = step[:n_active], stages[:n_active]
    advance = (live >= 0) & (live < counts)
    live += advance.to(live.dtype)
    done.zero_()
    done[:n_active] = advance & (live == counts)
    return int(done.sum())


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on ``device`` without blocking the host: on CUDA through pinned memory, copied
    asynchronously (the caching host allocator keeps the pinned block until the copy has run)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _slot_rows(t: Tensor, dim: int) -> tuple[int, int, int, int, int]:
    """(address, outer count, outer stride, slot stride, row bytes) of the slots of ``t`` along ``dim``."""
    if not t.is_cpu:
        raise ValueError(f"the native compaction moves CPU tensors; got one on {t.device}")
    row = t.select(dim, 0)
    row = row.select(0, 0) if dim == 1 else row
    if not row.is_contiguous():
        raise ValueError("each slot's data must be contiguous (the dims after the slot axis)")
    size = t.element_size()
    row_bytes = row.numel() * size
    if t.stride(dim) * size < row_bytes:
        raise ValueError("slots overlap: the slot stride is smaller than a slot's data")
    outer, outer_stride = (1, 0) if dim == 0 else (t.shape[0], t.stride(0) * size)
    return t.data_ptr(), outer, outer_stride, t.stride(dim) * size, row_bytes


class SlotCompactor:
    """Moves a batcher's surviving slots to the front of its fixed per-slot buffers ``(tensor, slot axis 0
    or 1)``, in order: ``t.narrow(axis, 0, m)[:] = t.index_select(axis, keep)`` for every buffer, then
    gives the freed slots ``m..clear_to-1`` of each buffer with a ``fills`` entry that value (a free slot's:
    a tensor of one slot's shape, or a number; None: the buffer's freed slots keep their data).

    The buffers are validated once and their addresses kept, so they must not be reallocated afterwards; each
    call is then one C++ call (``native=True``, CPU tensors) or one gather and fill per buffer in torch (any
    device). ``keep``: strictly increasing slot indices.
    """

    def __init__(self, buffers: list[tuple[Tensor, int]], native: bool,
                 fills: list[Tensor | float | None] | None = None) -> None:
        if not buffers:
            raise ValueError("no buffers to compact")
        self.buffers, self.native = list(buffers), native
        for t, d in self.buffers:
            if d not in (0, 1) or d >= t.dim():
                raise ValueError(f"the slot axis must be 0 or 1 of the tensor, not {d} of a {t.dim()}-d one")
        fills = [None] * len(self.buffers) if fills is None else list(fills)
        if len(fills) != len(self.buffers):
            raise ValueError(f"{len(fills)} fills for {len(self.buffers)} buffers (None: no fill)")
        # each fill as one slot of its buffer: [outer, *slot] for a slot axis 1, [*slot] for axis 0
        self.fills = [None if f is None else torch.as_tensor(f, dtype=t.dtype).to(t.device).expand(
            t.select(d, 0).shape).contiguous() for f, (t, d) in zip(fills, self.buffers, strict=True)]
        self.slots = min(t.shape[d] for t, d in self.buffers)
        if native:
            if _native is None:
                raise RuntimeError(REASON)
            self._layout = [_slot_rows(t, d) for t, d in self.buffers]
            if any(f is not None and d == 1 and t.shape[0] > 1
                   for f, (t, d) in zip(self.fills, self.buffers, strict=True)):
                raise ValueError("the native compaction fills slots on axis 0 only")
            self._fills = [b"" if f is None else f.reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
                           for f in self.fills]  # raw bytes: any dtype (bfloat16 too)

    def __call__(self, keep: list[int], clear_to: int | None = None) -> None:
        """Move ``keep`` to the front, then fill slots ``len(keep)..clear_to-1`` (None: none)."""
        m = len(keep)
        clear_to = m if clear_to is None else clear_to
        if self.native:  # checks keep and clear_to itself
            _native.compact_slots(self._layout, keep, self.slots, clear_to, self._fills)
            return
        if any(a >= b for a, b in zip(keep, keep[1:], strict=False)) or (
                keep and not 0 <= keep[0] <= keep[-1] < self.slots):
            raise ValueError(f"keep must be strictly increasing slot indices in [0, {self.slots})")
        if not m <= clear_to <= self.slots:
            raise ValueError(f"clear_to must be in [len(keep), {self.slots}], got {clear_to}")
        idx = {torch.device("cpu"): torch.tensor(keep, dtype=torch.int64)}
        for (t, d), fill in zip(self.buffers, self.fills, strict=True):
            if keep != list(range(m)):
                if t.device not in idx:
                    idx[t.device] = host_to_device(idx[torch.device("cpu")], t.device)
                t.narrow(d, 0, m).copy_(t.index_select(d, idx[t.device]))
            if fill is not None and clear_to > m:
                t.narrow(d, m, clear_to - m).copy_(fill.unsqueeze(d))


class SlotStepper:
    """A slot pool's step-and-advance over its fixed buffers: on slots ``0..b-1``,
    :func:`ragged_step_advance_native` (``native=True``) or :func:`ragged_step_advance_torch`, with the
    denoiser's output ``raw`` ``[b, ...]``, the first ``n_active`` slots advancing.

    The buffers (state ``y``, ``stash``, history ``hist[K, slots, ...]``, table ``rows``/``time`` laid out as
    :class:`~indis.kernels.ragged_step.PackedTable` with a stash, counters ``step``, stage counts ``stages``,
    flags ``done``) are validated once and their addresses kept, so they must not be reallocated afterwards;
    each call then checks only ``raw`` and passes the kept arguments on.
    """

    def __init__(self, y: Tensor, stash: Tensor, hist: Tensor, rows: Tensor, time: Tensor, step: Tensor,
                 stages: Tensor, done: Tensor, native: bool) -> None:
        self.y, self.stash, self.hist, self.rows, self.time = y, stash, hist, rows, time
        self.step, self.stages, self.done, self.native = step, stages, done, native
        self.history = hist.shape[0]
        table = PackedTable(rows, time, None, self.history, True)
        _check(y, y, stash, hist, table, step)
        _check_advance(y, step, stages, done, 0)
        if native:
            kept, args = _native_args(y, y, stash, hist, table, step, 1)
            if kept is not rows:
                raise ValueError("the table rows must be contiguous, in the state's dtype")
            # (y, raw, ...) -> the addresses around raw's, and the sizes around the batch size and threads
            self._head, self._mid, self._tail = args[0], args[2:8], args[9:15]
            self._counters = (stages.data_ptr(), done.data_ptr())
            self._bucket_shapes = [(b, *y.shape[1:]) for b in range(y.shape[0] + 1)]
            self._numel, self._float_bits = y[0].numel(), 8 * y.element_size()
            if time.dtype != y.dtype or not time.is_contiguous() or not step.is_contiguous():
                raise ValueError("the network times must be contiguous in the state's dtype, the counters "
                                 "contiguous")
            self._times = (time.data_ptr(), step.data_ptr())
            self._times_sizes = (time.shape[1], 8 * step.element_size(), 8 * time.element_size())

    def __call__(self, raw: Tensor, b: int, n_active: int) -> int:
        """One step of slots ``0..b-1``; returns how many of the first ``n_active`` finished now."""
        if not (0 <= n_active <= b <= self.y.shape[0] and b >= 1):
            raise ValueError(f"need 0 <= n_active <= b, 1 <= b <= {self.y.shape[0]}, got n_active {n_active} "
                             f"and b {b}")
        if not self.native:
            table = PackedTable(self.rows[:b], self.time[:b], None, self.history, True)
            return ragged_step_advance_torch(self.y[:b], raw, self.stash[:b], self.hist[:, :b], table,
                                             self.step[:b], self.stages[:b], self.done[:b], n_active)
        y = self.y
        if (raw.shape != self._bucket_shapes[b] or raw.dtype != y.dtype or not raw.is_cpu
                or not raw.is_contiguous()):
            raise ValueError(f"raw {tuple(raw.shape)} {raw.dtype} on {raw.device} must be a contiguous "
                             f"CPU tensor [{b}, {', '.join(map(str, y.shape[1:]))}] in {y.dtype}")
        return _native.ragged_step_advance(self._head, raw.data_ptr(), *self._mid, b, *self._tail,
                                           torch.get_num_threads(), *self._counters, n_active)

    def take(self, slots: list[int]) -> tuple[Tensor, list[bool]]:
        """Copies of the states of ``slots`` ``[len(slots), ...]`` and whether each is finite (C++ only: a
        pool without it reads them itself, ``SlotPool.take``)."""
        self._need_native("take")
        rows = self.y.new_empty((len(slots), *self._bucket_shapes[1][1:]))
        return rows, _native.take_rows(self._head, self._numel, self.y.shape[0], slots, rows.data_ptr(),
                                       self._float_bits)

    def times(self, b: int) -> Tensor:
        """Each of slots ``0..b-1``'s network time at its own stage, ``time[i, max(step[i], 0)]`` (a new
        tensor; ``IndexError`` for a step past the table; C++ only: a pool without it gathers them itself,
        ``SlotPool.bucket_inputs``)."""
        self._need_native("times")
        if not 1 <= b <= self.y.shape[0]:
            raise ValueError(f"need 1 <= b <= {self.y.shape[0]}, got {b}")
        sigma = self.time.new_empty(b)
        _native.slot_times(*self._times, sigma.data_ptr(), b, *self._times_sizes)
        return sigma

    def _need_native(self, what: str) -> None:
        if not self.native:
            raise RuntimeError(f"SlotStepper.{what} is a C++ call; this stepper runs the torch twin")


def pool_kernels(device: torch.device, backend: str, dtype: torch.dtype) -> str | None:
    """How a continuous batcher's slot pool steps, chosen once: ``"native"`` (a CPU pool whose ``backend``,
    resolved by ``ragged_step.backend_for``, is ``native`` with a fused step for ``dtype``:
    :class:`SlotStepper` and :class:`SlotCompactor` in C++), ``"torch"`` (another CPU pool: their torch
    twins) or None (a device pool, or the triton backend run interpreted on CPU: it steps with
    ``ragged_step`` while the host keeps the counters, and compacts in torch)."""
    if device.type != "cpu" or backend == "triton":
        return None
    return "native" if backend == "native" and fused(backend, dtype) else "torch"
