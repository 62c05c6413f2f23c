"""The slot pool of a continuous batcher: fixed per-slot buffers and their bookkeeping (place, step, park,
remove).

Per slot: the solver state, stash and ring of history outputs, the packed coefficient rows of that sample's
own table (``sampling.pool_layout``), its network times, its stage counter ``step`` -- a device tensor the
fused kernel reads -- and its own stage count, plus its condition inputs (class labels, text embeddings:
one buffer per dotted path) and, under classifier-free guidance, its unconditional inputs and guidance scale.
Active samples hold slots
``0..n-1``; ``owners[i]`` is whatever the caller keeps for slot ``i`` (the batcher: the request's future).
The C++ or torch calls a pool makes are chosen once, by ``indis.kernels.native.pool_kernels``, and bound to
its buffers once (``SlotStepper``, ``SlotCompactor``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from indis.engine.core.conditions import unflatten
from indis.engine.core.families import Denoiser
from indis.engine.core.guidance import combine_guided
from indis.kernels.native import SlotCompactor, SlotStepper, pool_kernels
from indis.kernels.ragged_step import PackedTable, ragged_step

MAX_HISTORY = 3   # iPNDM order 4 and UniPC order 3 keep 3 older outputs
NUMPY_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64, torch.bool)


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
        self.owners: list = []          # per active slot, the caller's handle
        self.host_step: list[int] = []  # host copies of the counters where the kernel does not advance them
        self.host_stages: list[int] = []
        self.parked: list[bool] = []    # finished slots kept in the batch (step -1), see park()
        kernels = pool_kernels(self.device, backend, dtype)
        native = kernels == "native"
        self.stepper = None if kernels is None else SlotStepper(
            self.y, self.stash, self.hist, self.rows, self.time, self.step, self.stages, self.done, native)
        self._compact = SlotCompactor(
            [(self.y, 0), (self.stash, 0), (self.hist, 1), (self.rows, 0), (self.time, 0), (self.step, 0),
             (self.stages, 0), *((v, 0) for v in (*self.cond.values(), *self.uncond.values())),
             *(() if self.guidance_scale is None else ((self.guidance_scale, 0),))], native=native)

    @property
    def n(self) -> int:
        """Active slots (``0..n-1``)."""
        return len(self.owners)

    @property
    def free(self) -> int:
        return self.capacity - self.n

    def place(self, owners: list, states: Tensor, rows: Tensor, time: Tensor, stages: list[int],
              cond: dict[str, Tensor | list[int]], uncond: dict[str, Tensor] | None = None,
              guidance_scale: Tensor | None = None) -> None:
        """Write ``g = len(owners)`` samples into slots ``n..n+g-1``: states ``[g, *shape]``, rows and times
        from ``sampling.pool_layout``, stage counts, condition inputs ``[g, ...]`` per path (a path left out
        gets the idle value), and under guidance their unconditional inputs and scales ``[g]`` (one write
        per buffer). The slots count as active only after every write; a failed place leaves them free
        (:meth:`clear`)."""
        g = len(owners)
        slots = slice(self.n, self.n + g)
        w, value = self.w, self.value
        if self.guidance is not None and (uncond is None or guidance_scale is None):
            raise ValueError("a pool with guidance needs each sample's uncond and guidance_scale")
        w["y"][slots] = value(states)
        w["rows"][slots] = value(rows)
        w["time"][slots] = value(time)
        w["step"][slots] = 0
        w["stages"][slots] = stages
        for k, idle in self.idle.items():
            w[f"cond.{k}"][slots] = value(torch.as_tensor(cond[k])) if k in cond else idle
            if self.guidance is not None:
                w[f"uncond.{k}"][slots] = value(uncond[k]) if k in uncond else idle
        if self.guidance is not None:
            w["guidance_scale"][slots] = value(guidance_scale)
        self.owners += owners
        self.host_step += [0] * g
        self.host_stages += list(stages)
        self.parked += [False] * g

    def clear(self, start: int, stop: int) -> None:
        """Mark slots ``start..stop-1`` free (counters and idle values; the state is zeroed)."""
        w, free = self.w, slice(start, stop)
        w["y"][free] = 0
        w["step"][free] = -1
        w["stages"][free] = 0
        for k, idle in self.idle.items():
            w[f"cond.{k}"][free] = idle
            if self.uncond:
                w[f"uncond.{k}"][free] = idle
        if self.guidance_scale is not None:
            w["guidance_scale"][free] = 0

    def value(self, t: Tensor) -> Tensor | np.ndarray:
        """``t`` as this pool's writes take it: a numpy view on a host pool, else the tensor."""
        return t.numpy() if self.host else t

    def bucket_inputs(self, b: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The denoiser call's inputs over slots ``0..b-1``: states, each slot's network time at its stage,
        conditions as a tree (idle slots hold zeros and their idle values; their outputs are masked)."""
        if self.host:
            sigma = torch.from_numpy(self.w["time"][self.slot_index[:b], np.maximum(self.w["step"][:b], 0)])
        else:
            sigma = self.time[:b].gather(1, self.step[:b].clamp(min=0).long()[:, None]).squeeze(1)
        return self.y[:b], sigma, unflatten({k: v[:b] for k, v in self.cond.items()})

    def step_slots(self, raw: Tensor, b: int) -> tuple[int, list[int], list[int]]:
        """One fused step of slots ``0..b-1`` with the denoiser's output ``raw`` and the counters' advance;
        returns (slots stepped, finished slots, slots finished by this step). Parked slots do not move."""
        n = self.n
        if self.stepper is None:  # the kernel steps; the host advances its own copies of the counters
            table = PackedTable(self.rows[:b], self.time[:b], None, MAX_HISTORY, True)
            ragged_step(self.y[:b], raw, self.stash[:b], self.hist[:, :b], table, self.step[:b], self.backend)
            live = self.step[:n]
            live += (live >= 0).to(torch.int32)
            stepped, done, just = 0, [], []
            for i in range(n):
                if self.host_step[i] < self.host_stages[i]:
                    self.host_step[i] += 1
                    stepped += 1
                    if self.host_step[i] == self.host_stages[i]:
                        just.append(i)
                if self.host_step[i] >= self.host_stages[i]:
                    done.append(i)
            return stepped, done, just
        finished = self.stepper(raw, b, n)
        parked = sum(self.parked)
        just = self.w["done"][:n].nonzero()[0].tolist() if finished else []
        done = just if parked + len(just) < n else list(range(n))
        return n - parked, done, just

    def take(self, slots: list[int]) -> tuple[tuple[Tensor, ...], list[bool]]:
        """Copies of the states of ``slots`` (before they are freed) and whether each is finite."""
        if self.host:
            rows = self.w["y"][slots]
            return torch.from_numpy(rows).unbind(0), np.isfinite(rows.reshape(len(slots), -1)).all(1).tolist()
        rows = self.y.index_select(0, torch.tensor(slots, device=self.device))
        return rows.unbind(0), torch.isfinite(rows.flatten(1)).all(1).tolist()

    def park(self, slots: list[int]) -> None:
        """Keep finished ``slots`` in the batch without stepping them again (step -1, masked)."""
        if slots:
            self.w["step"][slots] = -1
            for i in slots:
                self.parked[i] = True

    def remove(self, gone: list[int]) -> None:
        """Free slots ``gone``: the remaining ones move to the front, in order, and the tail is cleared."""
        n, drop = self.n, set(gone)
        keep = [i for i in range(n) if i not in drop]
        m = len(keep)
        if keep != list(range(m)):
            self._compact(keep)
        for name in ("owners", "host_step", "host_stages", "parked"):
            items = getattr(self, name)
            setattr(self, name, [items[i] for i in keep])
        self.clear(m, n)

    def reset(self) -> list:
        """Free every slot without reading the buffers (after a failure they are not trusted); returns the
        owners that were active."""
        owners = self.owners
        self.owners, self.host_step, self.host_stages, self.parked = [], [], [], []
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
