"""The slot pool of a continuous batcher: fixed per-slot buffers and their bookkeeping (place, step, park,
remove).

Per slot: the solver state, stash and ring of history outputs, the packed coefficient rows of that sample's
own table (``sampling.pool_layout``), its network times, its stage counter ``step`` -- a device tensor the
fused kernel reads -- and its own stage count, plus its condition inputs (class labels, text embeddings:
one buffer per dotted path) and, under classifier-free guidance, its unconditional inputs and guidance scale.
Active samples hold slots
``0..n-1``; ``owners[i]`` is whatever the caller keeps for slot ``i`` (the batcher: the request's future).
The C++ or torch calls a pool makes are chosen once, by ``indis.kernels.native.pool_kernels``, and bound to
its buffers once (``SlotStepper``, ``SlotCompactor``): with the C++ extension a CPU pool's network times,
retirement reads and compaction are C++ calls; the rest of a CPU pool's bookkeeping (placement, parking) goes
through numpy views of its buffers. A device pool's placement is one staged copy (:func:`staged_copy`) and
nothing it does waits for the device (its results' finiteness flags come back asynchronously:
:class:`Taken`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from indis.engine.core.conditions import unflatten
from indis.engine.core.families import Denoiser
from indis.engine.core.guidance import combine_guided
from indis.kernels.native import SlotCompactor, SlotStepper, host_to_device, pool_kernels
from indis.kernels.ragged_step import PackedTable, ragged_step

MAX_HISTORY = 3   # iPNDM order 4 and UniPC order 3 keep 3 older outputs
NUMPY_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64, torch.bool)


def staged_copy(pieces: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """CPU tensors on ``device`` through one staging buffer: their bytes packed (8-byte aligned) into one
    tensor, copied once (on CUDA from pinned memory, asynchronously: ``host_to_device``) and viewed back."""
    chunks, spans, offset = [], [], 0
    for t in pieces:
        data = t.detach().contiguous().reshape(-1).view(torch.uint8)
        pad = -data.numel() % 8
        chunks += [data, torch.zeros(pad, dtype=torch.uint8)] if pad else [data]
        spans.append((offset, data.numel()))
        offset += data.numel() + pad
    staged = host_to_device(torch.cat(chunks), device) if chunks else None
    return [staged[o:o + n].view(t.dtype).view(t.shape) for t, (o, n) in zip(pieces, spans, strict=True)]


class Block(NamedTuple):
    """``count`` consecutive samples of one table build for :meth:`SlotPool.place`: their pool rows
    ``[count or 1, max_stages, R]`` and network times ``[count or 1, max_stages]`` (``sampling.pool_layout``;
    a single row is the whole block's) and their stage count."""

    count: int
    rows: Tensor
    time: Tensor
    stages: int


@dataclass
class Taken:
    """States read out of freed slots (``rows``) and whether each is finite: a list, or a host tensor a
    device copies into asynchronously until ``event`` has passed (:meth:`finite` waits for it)."""

    rows: tuple[Tensor, ...]
    flags: list[bool] | Tensor
    event: torch.cuda.Event | None = None

    def ready(self) -> bool:
        """Whether :meth:`finite` would return without waiting."""
        return self.event is None or self.event.query()

    def finite(self) -> list[bool]:
        if self.event is not None:
            self.event.synchronize()
        return self.flags if isinstance(self.flags, list) else self.flags.tolist()


class SlotPool:
    """``capacity`` slots of samples shaped ``shape`` in ``dtype`` on ``device``, each holding up to
    ``max_stages`` stages; ``conditions`` maps each condition input (a dotted path) to the value an idle slot
    holds (an int: a class label; a tensor: one sample's input, whose shape and dtype the buffer takes).
    ``guidance``: ``(rescale, batched)`` of classifier-free guidance, or None: then the pool also holds
    each slot's unconditional inputs (same paths) and guidance scale. ``host``: whether the bookkeeping goes
    through numpy views of the buffers (None: wherever it can, a CPU pool whose buffers numpy can view)."""

    def __init__(self, capacity: int, shape: Sequence[int], *, max_stages: int,
                 conditions: dict[str, int | Tensor], device: torch.device, dtype: torch.dtype, backend: str,
                 guidance: tuple[float, bool] | None = None, host: bool | None = None) -> None:
        self.capacity, self.shape, self.max_stages = capacity, tuple(shape), max_stages
        self.device, self.dtype, self.backend = device, dtype, backend
        self.idle_cond = {k: torch.as_tensor(v, dtype=torch.long if isinstance(v, int) else None).to(device)
                          for k, v in conditions.items()}
        self.guidance = guidance
        c = capacity
        self.y = torch.zeros(c, *self.shape, device=device, dtype=dtype)
        self.stash = torch.zeros_like(self.y)
        self.hist = torch.zeros(MAX_HISTORY, c, *self.shape, device=device, dtype=dtype)
        self.coef_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        width = 2 + 2 * (3 + MAX_HISTORY)
        self.rows = torch.zeros(c, max_stages, width, device=device, dtype=self.coef_dtype)
        self.time = torch.zeros(c, max_stages, device=device, dtype=dtype)
        self.step = torch.full((c,), -1, device=device, dtype=torch.int32)
        self.stages = torch.zeros(c, dtype=torch.int64)    # each slot's own stage count (0: free)
        self.done = torch.zeros(c, dtype=torch.bool)        # CPU pools: slots finished in this step
        self.cond = {k: v.new_empty((c, *v.shape)).copy_(v) for k, v in self.idle_cond.items()}
        self.uncond = {k: v.new_empty(v.shape).copy_(v) for k, v in self.cond.items()} if guidance else {}
        self.guidance_scale = torch.zeros(c, device=device, dtype=dtype) if guidance else None
        # The bookkeeping writes and reads (place, clear, take, the network times) go through numpy views of a
        # CPU pool's buffers, a fraction of a torch call's cost each; a device pool's are the tensors.
        named = {"y": self.y, "rows": self.rows, "time": self.time, "step": self.step, "stages": self.stages,
                 "done": self.done, **{f"cond.{k}": v for k, v in self.cond.items()},
                 **{f"uncond.{k}": v for k, v in self.uncond.items()},
                 **({} if self.guidance_scale is None else {"guidance_scale": self.guidance_scale})}
        viewable = device.type == "cpu" and all(t.dtype in NUMPY_DTYPES for t in named.values())
        if host and not viewable:
            raise ValueError(f"host=True needs a CPU pool whose buffers numpy can view ({device}, {dtype})")
        self.host = viewable if host is None else host
        self.w = {k: self.value(t) for k, t in named.items()}
        self.w["stages"], self.w["done"] = self.stages.numpy(), self.done.numpy()  # on the CPU in every pool
        self.idle = {k: self.value(v) for k, v in self.idle_cond.items()}
        self.slot_index = np.arange(c)
        self.owners: list = []  # per active slot, the caller's handle
        # on the host in every pool: the counters' copies where the kernel does not advance them on the host,
        # and the finished slots kept in the batch (step -1, see park())
        host_step, parked = torch.zeros(c, dtype=torch.int64), torch.zeros(c, dtype=torch.bool)
        self.host_step, self._parked = host_step.numpy(), parked.numpy()
        self._views: dict[int, tuple[Tensor, dict]] = {}  # per bucket: its state and condition views
        kernels = pool_kernels(self.device, backend, dtype)
        native = kernels == "native"
        self.stepper = None if kernels is None else SlotStepper(
            self.y, self.stash, self.hist, self.rows, self.time, self.step, self.stages, self.done, native)
        # every per-slot buffer moves with its slot; a freed slot gets a free slot's value where one matters
        idle = [*self.idle_cond.values(), *(self.idle_cond.values() if self.uncond else ())]
        self._compact = SlotCompactor(
            [(self.y, 0), (self.stash, 0), (self.hist, 1), (self.rows, 0), (self.time, 0), (self.step, 0),
             (self.stages, 0), *((v, 0) for v in (*self.cond.values(), *self.uncond.values())),
             *(() if self.guidance_scale is None else ((self.guidance_scale, 0),)), (host_step, 0),
             (parked, 0)], native=native,
            fills=[0, None, None, None, None, -1, 0, *idle, *(() if self.guidance_scale is None else (0,)),
                   0, False])

    @property
    def n(self) -> int:
        """Active slots (``0..n-1``)."""
        return len(self.owners)

    @property
    def free(self) -> int:
        return self.capacity - self.n

    @property
    def parked(self) -> list[bool]:
        """Per active slot, whether it is a finished slot kept in the batch (:meth:`park`)."""
        return self._parked[:self.n].tolist()

    def place(self, owners: list, states: Tensor, blocks: Sequence[Block],
              cond: dict[str, Tensor | list[int]], uncond: dict[str, Tensor] | None = None,
              guidance_scale: Tensor | None = None) -> None:
        """Write ``g = len(owners)`` samples into slots ``n..n+g-1``: states ``[g, *shape]``, their tables as
        :class:`Block` s in slot order, condition inputs ``[g, ...]`` per path (a path left out gets the idle
        value), and under guidance their unconditional inputs and scales ``[g]`` (one write per buffer and
        block). The slots count as active only after every write; a failed place leaves them free
        (:meth:`clear`)."""
        g = len(owners)
        if sum(block.count for block in blocks) != g:
            raise ValueError(f"the blocks hold {sum(block.count for block in blocks)} samples, not {g}")
        slots = slice(self.n, self.n + g)
        w, value = self.w, self.value
        if self.guidance is not None and (uncond is None or guidance_scale is None):
            raise ValueError("a pool with guidance needs each sample's uncond and guidance_scale")
        given = {"y": states}
        for k in self.idle:
            if k in cond:
                given[f"cond.{k}"] = torch.as_tensor(cond[k])
            if self.guidance is not None and k in uncond:
                given[f"uncond.{k}"] = uncond[k]
        if self.guidance is not None:
            given["guidance_scale"] = guidance_scale
        start = self.n
        for b in blocks:
            block = slice(start, start + b.count)
            w["stages"][block] = b.stages
            if self.host:  # a single row broadcasts over the block
                w["rows"][block], w["time"][block] = value(b.rows), value(b.time)
            start += b.count
        if not self.host:  # a device pool: one staged copy in the buffers' dtypes, then writes on the device
            given["rows"] = torch.cat([b.rows.expand(b.count, *b.rows.shape[1:]) for b in blocks])
            given["time"] = torch.cat([b.time.expand(b.count, *b.time.shape[1:]) for b in blocks])
            pieces = [v.to("cpu", self.w[k].dtype) for k, v in given.items()]
            given = dict(zip(given, staged_copy(pieces, self.device), strict=True))
        for name, v in given.items():
            w[name][slots] = value(v)
        for k, idle in self.idle.items():
            if f"cond.{k}" not in given:
                w[f"cond.{k}"][slots] = idle
            if self.guidance is not None and f"uncond.{k}" not in given:
                w[f"uncond.{k}"][slots] = idle
        w["step"][slots] = 0
        self.host_step[slots], self._parked[slots] = 0, False
        self.owners += owners

    def clear(self, start: int, stop: int) -> None:
        """Mark slots ``start..stop-1`` free (counters and idle values; the state is zeroed)."""
        self._compact(list(range(start)), stop)

    def value(self, t: Tensor) -> Tensor | np.ndarray:
        """``t`` as this pool's writes take it: a numpy view on a host pool, else the tensor."""
        return t.numpy() if self.host else t

    def bucket_inputs(self, b: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The denoiser call's inputs over slots ``0..b-1``: states, each slot's network time at its stage,
        conditions as a tree (idle slots hold zeros and their idle values; their outputs are masked)."""
        if self.stepper is not None and self.stepper.native:
            sigma = self.stepper.times(b)
        elif self.host:
            sigma = torch.from_numpy(self.w["time"][self.slot_index[:b], np.maximum(self.w["step"][:b], 0)])
        else:
            stage = self.step[:b].clamp(0, self.max_stages - 1).long()  # idle / finished: any valid index
            sigma = self.time[:b].gather(1, stage[:, None]).squeeze(1)
        if b not in self._views:  # the buffers are never reallocated: each bucket's views are made once
            self._views[b] = self.y[:b], {k: v[:b] for k, v in self.cond.items()}
        y, cond = self._views[b]
        return y, sigma, unflatten(cond)  # a new tree per call: the model may change it

    def iterate(self, den: Denoiser, b: int, replay: Callable[[int], None] | None = None
                ) -> tuple[int, list[int], list[int]]:
        """One iteration of slots ``0..b-1``: the denoiser call, the fused step and the counters' advance
        (``replay(b)``: a captured :meth:`step_device` of a pool without a stepper); returns what
        :meth:`step_slots` does."""
        if self.stepper is not None:
            return self.step_slots(self.raw(den, b), b)
        if replay is not None:
            replay(b)
        else:
            self.step_device(den, b)
        return self.advance_host()

    def step_device(self, den: Denoiser, b: int) -> None:
        """A pool without a stepper (a device pool): the denoiser call, the fused step and the counters'
        advance as device work only, nothing read back (what ``bucket_graphs.BucketGraphs`` captures)."""
        self.step_kernel(self.raw(den, b), b)

    def step_kernel(self, raw: Tensor, b: int) -> None:
        """The fused step of slots ``0..b-1`` (``ragged_step``) and the device counters' advance (idle and
        parked slots hold step -1 and do not move; a finished slot is never left in the pool)."""
        table = PackedTable(self.rows[:b], self.time[:b], None, MAX_HISTORY, True)
        ragged_step(self.y[:b], raw, self.stash[:b], self.hist[:, :b], table, self.step[:b], self.backend)
        live = self.step[:b]
        live += (live >= 0).to(torch.int32)

    def advance_host(self) -> tuple[int, list[int], list[int]]:
        """The host's copies of the counters after a step (:meth:`step_slots`' result)."""
        n = self.n
        step, stages = self.host_step[:n], self.w["stages"][:n]
        live = (step < stages) & ~self._parked[:n]
        step += live
        finished = (step >= stages) | self._parked[:n]
        return int(live.sum()), finished.nonzero()[0].tolist(), (live & finished).nonzero()[0].tolist()

    def step_slots(self, raw: Tensor, b: int) -> tuple[int, list[int], list[int]]:
        """One fused step of slots ``0..b-1`` with the denoiser's output ``raw`` and the counters' advance;
        returns (slots stepped, finished slots, slots finished by this step). Parked slots do not move."""
        n = self.n
        if self.stepper is None:  # the kernel steps; the host advances its own copies of the counters
            self.step_kernel(raw, b)
            return self.advance_host()
        finished = self.stepper(raw, b, n)
        parked = np.count_nonzero(self._parked[:n])
        just = self.w["done"][:n].nonzero()[0].tolist() if finished else []
        done = just if parked + len(just) < n else list(range(n))
        return n - parked, done, just

    def take(self, slots: list[int]) -> Taken:
        """Copies of the states of ``slots`` (before they are freed) and whether each is finite; on CUDA
        the flags come back asynchronously (nothing here waits for the device)."""
        if self.stepper is not None and self.stepper.native:
            rows, finite = self.stepper.take(slots)
            return Taken(rows.unbind(0), finite)
        if self.host:
            rows = self.w["y"].take(slots, axis=0)
            return Taken(torch.from_numpy(rows).unbind(0),
                         np.isfinite(rows.reshape(len(slots), -1)).all(1).tolist())
        rows = self.y.index_select(0, host_to_device(torch.tensor(slots), self.device))
        flags = torch.isfinite(rows.flatten(1)).all(1)
        if self.device.type != "cuda":
            return Taken(rows.unbind(0), flags.tolist())
        host = torch.empty(len(slots), dtype=torch.bool, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return Taken(rows.unbind(0), host, event)

    def park(self, slots: list[int]) -> None:
        """Keep finished ``slots`` in the batch without stepping them again (step -1, masked)."""
        if slots:
            self.w["step"][slots if self.host else host_to_device(torch.tensor(slots), self.device)] = -1
            self._parked[slots] = True

    def remove(self, gone: list[int]) -> None:
        """Free slots ``gone``: the remaining ones move to the front, in order, and the tail is cleared."""
        n, drop = self.n, set(gone)
        keep = [i for i in range(n) if i not in drop]
        self._compact(keep, n)
        owners = self.owners
        self.owners = [owners[i] for i in keep]

    def reset(self) -> list:
        """Free every slot without reading the buffers (after a failure they are not trusted); returns the
        owners that were active."""
        owners, self.owners = self.owners, []
        self.clear(0, self.capacity)
        return owners

    def raw(self, den: Denoiser, b: int) -> Tensor:
        """The denoiser's raw output for slots ``0..b-1`` at each slot's own stage."""
        y, sigma, cond = self.bucket_inputs(b)
        if self.guidance is None:
            return den.raw(y, sigma, **cond).contiguous()
        uncond = unflatten({k: v[:b] for k, v in self.uncond.items()})
        rescale, batched = self.guidance
        # the pool's uncond rows match its conditions by construction: no per-iteration checks
        return combine_guided(den, y, sigma, cond, uncond, self.guidance_scale[:b], rescale,
                              batched).contiguous()
