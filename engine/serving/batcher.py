"""Step-level continuous batching: samples at different steps of different grids share one denoiser call.

A :class:`ContinuousBatcher` owns a slot pool of fixed ``capacity``: per slot the solver state, stash, ring of
history outputs, the packed coefficient rows of that sample's own table (any solver, any NFE, any grid, INDIS
shift/scale) and its stage counter ``step`` -- a device tensor, read by the fused kernel
(``indis.kernels.ragged_step``). Active samples are kept in slots ``0..n-1``; each iteration

1. admits waiting requests into free slots (inputs validated and tables built per request group; a request
   whose inputs are bad fails alone with the error, before it takes a slot),
2. runs one denoiser call on ``pool[:b]`` with each slot's own sigma, ``b`` = the smallest bucket >= n (so
   compiled graphs / engine profiles are reused; idle slots hold zeros and are masked),
3. one fused ragged step over the same slots, and
4. retires finished samples (each result is delivered exactly once), moving the remaining slots to the front.

On a CPU pool steps 3 and 4's bookkeeping are one call: ``indis.kernels.native.ragged_step_advance_native``
(C++, when the backend resolves to ``native``) or its torch twin steps the slots, advances each slot's stage
counter up to its own stage count (``stages``) and flags the finished slots (``done``); the compaction of
step 4 is one more (``SlotCompactor``; elsewhere one torch gather per buffer). On a device pool
the host keeps its own copy of the counters (no device-to-host reads).

Results equal running each request alone (the per-sample table and update are the same; the denoiser must
treat samples independently). ``policy="static"`` is the baseline a server without ragged solvers has: it
admits a new batch only when the previous one has finished and runs every batch to its longest request.

Errors: a denoiser exception fails the requests in that call (each future gets it) and the batcher goes on
with the rest; in the loops of ``start`` and ``run_all`` any other exception in an iteration fails the
requests in the pool and the loop goes on (``iterate``, for driving by hand, lets it propagate). Should the
background loop itself stop, every waiting and live request fails with the reason and ``submit`` refuses new
ones. Cancelling a request's future frees its slot at the next iteration, whenever it happens (also while it
is validated). One driver at a time: ``start``, ``run_all`` or ``iterate`` while another drives the batcher
raises. ``run_all`` is the synchronous front; ``start``/``submit``/``close`` run the loop in a background
thread (``submit`` returns a ``concurrent.futures.Future``).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from indis.engine.core.families import Denoiser, as_denoiser
from indis.engine.core.sampling import check_inputs, check_schedule, check_solver, check_state
from indis.engine.core.schedules import HEURISTICS, Schedule, get_sigmas
from indis.engine.core.solvers import build_table
from indis.engine.serving.allocation import NFEChooser
from indis.engine.tuning.teacher import initial_state, noise_from_seeds
from indis.kernels.native import SlotCompactor, ragged_step_advance_native, ragged_step_advance_torch
from indis.kernels.ragged_step import PackedTable, backend_for, fused, ragged_step

log = logging.getLogger("indis.serving")
MAX_HISTORY = 3   # iPNDM order 4 and UniPC order 3 keep 3 older outputs


@dataclass
class Request:
    """One sample to generate.

    ``x_T`` (``[*shape]``, already at the grid's first noise level, in the model family's coordinate) or
    ``seed`` (``x_T = teacher.initial_state(noise_from_seeds(seed), sigma_max, family)``: ``sigma_max`` times
    the noise for VE, its VP / flow scaling otherwise); ``schedule``: a heuristic name (``edm``,
    ``logsnr``, ...), ``"predictor"`` (the batcher's INDIS predictor for this NFE and solver), an explicit
    ``[N+1]`` grid or a :class:`Schedule`; ``cond``: per-sample condition values (e.g.
    ``{"class_labels": 3}``; None: none). ``nfe="auto"``:
    the batcher's :class:`~indis.engine.allocation.NFEChooser` picks it from x_T (and the condition) at
    admission; the future then carries it as ``future.nfe``.
    """

    x_T: Tensor | None = None
    seed: int | None = None
    nfe: int | str = 5
    solver: str = "ipndm"
    schedule: str | Tensor | Schedule = "edm"
    cond: dict[str, int] = field(default_factory=dict)
    solver_opts: dict = field(default_factory=dict)


@dataclass
class _Live:
    future: Future
    stages: int
    step: int = 0  # host copy of the slot's stage counter, kept where ragged_step steps (device, triton)


def _opts_key(opts: dict) -> tuple:
    """A request's solver options as a hashable key (lists become tuples); ValueError for anything else
    unhashable or a non-string name."""
    if not isinstance(opts, dict) or not all(isinstance(k, str) for k in opts):
        raise ValueError(f"solver_opts={opts!r} must be a dict of option names to values")
    items = []
    for k, v in sorted(opts.items()):
        v = tuple(v) if isinstance(v, list) else v
        try:
            hash(v)
        except TypeError:
            raise ValueError(f"solver option {k}={v!r} must be a number, string, bool or list") from None
        kind = tuple(type(e).__name__ for e in v) if isinstance(v, tuple) else type(v).__name__
        items.append((k, kind, v))  # 2 and 2.0 (or 1 and True) hash alike but are different options
    return tuple(items)


def _as_value_error(e: Exception) -> ValueError:
    """A request's validation failure as ``ValueError`` (the original as its ``__cause__``)."""
    if isinstance(e, ValueError):
        return e
    error = ValueError(_describe(e))
    error.__cause__ = e
    return error


def _describe(e: BaseException) -> str:
    """``"Type: message"`` of an exception, even one whose ``str`` fails."""
    try:
        return f"{type(e).__name__}: {e}"
    except Exception:  # noqa: BLE001 - a broken __str__ must not break error delivery
        return type(e).__name__


def default_buckets(capacity: int) -> tuple[int, ...]:
    """Powers of two up to ``capacity`` (and ``capacity`` itself)."""
    out, b = [], 1
    while b < capacity:
        out.append(b)
        b *= 2
    return (*out, capacity)


class ContinuousBatcher:
    """A slot pool serving a stream of :class:`Request` (see the module docstring).

    ``conditions``: the condition inputs the model takes and their valid integer range ``(low, high)``
    (values outside fail the request alone; an idle slot holds ``low``), e.g. ``{"class_labels": (-1, 10)}``.
    ``predictors``: ``{(nfe, solver): phi}`` with ``phi(x_T[B], cond) -> Schedule`` for
    ``schedule="predictor"`` (``predictor_cond`` names the condition it reads; an NFE ``chooser`` reads it
    too, for requests with ``nfe="auto"``).
    """

    def __init__(self, model: Callable[..., Tensor] | Denoiser, shape: Sequence[int], *, capacity: int = 32,
                 buckets: Sequence[int] | None = None, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 predictors: dict[tuple[int, str], Callable] | None = None, predictor_cond: str | None = None,
                 chooser: NFEChooser | None = None,
                 conditions: dict[str, tuple[int, int]] | None = None, max_stages: int = 16,
                 max_waiting: int = 100_000, policy: str = "continuous", device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, backend: str | None = None) -> None:
        if policy not in ("continuous", "static"):
            raise ValueError(f"policy={policy!r}: choose continuous or static")
        self.den = as_denoiser(model)
        self.shape, self.capacity = tuple(shape), capacity
        self.buckets = tuple(sorted(set(buckets or default_buckets(capacity))))
        if self.buckets[-1] != capacity or self.buckets[0] < 1:
            raise ValueError(f"buckets {self.buckets} must be positive and end at the capacity {capacity}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.predictors, self.predictor_cond, self.chooser = dict(predictors or {}), predictor_cond, chooser
        self.conditions = dict(conditions or {})
        self.max_stages, self.max_waiting, self.policy = max_stages, max_waiting, policy
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype}: the pool holds samples in a floating-point dtype (float16, "
                             f"bfloat16, float32 or float64)")
        self.device, self.dtype = torch.device(device), dtype
        self.backend = backend_for(self.device, backend)
        width = 3 + MAX_HISTORY
        c = capacity
        self.y = torch.zeros(c, *self.shape, device=self.device, dtype=dtype)
        self.stash = torch.zeros_like(self.y)
        self.hist = torch.zeros(MAX_HISTORY, c, *self.shape, device=self.device, dtype=dtype)
        coef_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.rows = torch.zeros(c, max_stages, 2 + 2 * width, device=self.device, dtype=coef_dtype)
        self.time = torch.zeros(c, max_stages, device=self.device, dtype=dtype)
        self.step = torch.full((c,), -1, device=self.device, dtype=torch.int32)
        self.stages = torch.zeros(c, dtype=torch.int64)    # each slot's own stage count (0: free)
        self.done = torch.zeros(c, dtype=torch.bool)        # CPU pools: slots finished in this iteration
        self.cond = {k: torch.full((c,), lo, device=self.device, dtype=torch.long)
                     for k, (lo, _) in self.conditions.items()}
        self.live: list[_Live] = []          # slots 0..n-1
        self.waiting: deque[tuple[Request, Future]] = deque()
        self.stats = {"iterations": 0, "admitted": 0, "completed": 0, "failed": 0, "cancelled": 0,
                      "slot_steps": 0, "padded_steps": 0}
        self._tables: dict[tuple, tuple[Tensor, Tensor, int]] = {}  # heuristic schedules: one table each
        self._cancel_seen = False  # set by a live future's done-callback when it is cancelled
        self._compact = SlotCompactor(
            [(self.y, 0), (self.stash, 0), (self.hist, 1), (self.rows, 0), (self.time, 0), (self.step, 0),
             (self.stages, 0), *((v, 0) for v in self.cond.values())],
            native=self._host_advance() is ragged_step_advance_native)
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._driver = threading.Lock()  # held by the one loop that drives this batcher
        self._owner: threading.Thread | None = None
        self._closing = False

    # ------------------------------------------------------------------------------------------- front
    def submit(self, request: Request) -> Future:
        """Queue a request; its future gets the sample ``[*shape]`` (or the reason it failed)."""
        fut: Future = Future()
        with self._lock:
            if self._closing:
                raise RuntimeError("this batcher is closed")
            if len(self.waiting) >= self.max_waiting:
                fut.set_exception(RuntimeError(f"queue full ({self.max_waiting} waiting requests)"))
                return fut
            self.waiting.append((request, fut))
            self._lock.notify()
        return fut

    def run_all(self, requests: Sequence[Request]) -> list[Tensor]:
        """Serve ``requests`` to completion in this thread; results in request order (raises the first
        failure after everything else finished)."""
        self._drive()
        try:
            futures = [self.submit(r) for r in requests]
            while self.pending():
                self._guarded_iterate(flush=True)
        finally:
            self._undrive()
        return [f.result() for f in futures]

    def pending(self) -> int:
        with self._lock:
            return len(self.waiting) + len(self.live)

    def start(self) -> None:
        """Run the loop in a background thread (``submit`` from any thread; ``close`` to stop)."""
        if self._closing:
            raise RuntimeError("this batcher is closed")
        self._drive()

        def loop() -> None:
            try:
                while True:
                    with self._lock:
                        while not self.waiting and not self.live and not self._closing:
                            self._lock.wait()
                        if self._closing and not self.waiting and not self.live:
                            return
                    self._guarded_iterate(flush=self._closing)
                    with self._lock:  # a static batch still filling: nothing to do until a submit or close
                        while (self.policy == "static" and not self.live and not self._closing
                               and 0 < len(self.waiting) < self.capacity):
                            self._lock.wait()
            except BaseException as e:  # not an iteration's fault: the loop stops, and says so to everyone
                log.exception("batcher loop stopped")
                self._stop_everything(RuntimeError(f"batcher loop stopped: {_describe(e)}"))
                raise
            finally:
                self._undrive()

        try:
            self._thread = threading.Thread(target=loop, name="indis-batcher", daemon=True)
            self._owner = self._thread
            self._thread.start()
        except BaseException:
            self._undrive()
            raise

    def _drive(self) -> None:
        """Become the one loop driving this batcher (the caller's thread until ``_owner`` is reassigned)."""
        if not self._driver.acquire(blocking=False):
            raise RuntimeError("this batcher is already driven by a loop (start(), run_all() or iterate()); "
                               "submit() to it instead")
        self._owner = threading.current_thread()

    def _undrive(self) -> None:
        self._owner = None
        self._driver.release()

    def _guarded_iterate(self, flush: bool) -> int:
        """One iteration; any exception fails the requests in the pool and the loop goes on."""
        try:
            return self._iterate(flush)
        except Exception as e:  # noqa: BLE001 - the requests in the pool fail, the loop goes on
            log.exception("batcher iteration failed; failing its %d requests", len(self.live))
            self._fail_live(RuntimeError(f"batcher iteration failed: {_describe(e)}"))
            return 0

    def _fail_live(self, error: Exception) -> None:
        """Fail every request in the pool with ``error`` and free the pool (a last resort after an
        unexpected exception; the pool's buffers are reset, not trusted)."""
        try:
            self._release(list(range(len(self.live))), error)
        except Exception:  # noqa: BLE001 - the pool is beyond repair: deliver, then start it empty
            log.exception("freeing the pool failed; resetting it")
            live, self.live = self.live, []
            for item in live:
                self._fail(item.future, error)
            self.y.zero_()
            self.step.fill_(-1)
            self.stages.zero_()
            for k, (lo, _) in self.conditions.items():
                self.cond[k].fill_(lo)

    def _stop_everything(self, error: Exception) -> None:
        """The loop cannot go on: refuse new requests and fail every waiting and live one with ``error``."""
        with self._lock:
            self._closing = True
            waiting, self.waiting = list(self.waiting), deque()
            live, self.live = self.live, []
        for _, fut in waiting:
            self._fail(fut, error)
        for item in live:
            self._fail(item.future, error)

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests, finish the queued ones, join the loop thread."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -------------------------------------------------------------------------------------- iteration
    def iterate(self, flush: bool = False) -> int:
        """One iteration (admit, one denoiser call, one fused step, retire); returns the slots stepped.

        ``flush``: no more arrivals are expected (the static policy then runs a partial batch). For driving
        the batcher by hand: refused while a loop (``start`` / ``run_all``) or another ``iterate`` drives it.
        Exceptions propagate (the loops of ``start`` and ``run_all`` fail the pool's requests instead)."""
        self._drive()
        try:
            return self._iterate(flush)
        finally:
            self._undrive()

    def _iterate(self, flush: bool) -> int:
        self._drop_cancelled()
        self._admit(flush)
        n = len(self.live)
        if n == 0:
            return 0
        b = next(x for x in self.buckets if x >= n)
        step = self.step[:b]
        try:
            sigma = self.time[:b].gather(1, step.clamp(min=0).long()[:, None]).squeeze(1)
            raw = self.den.raw(self.y[:b], sigma, **{k: v[:b] for k, v in self.cond.items()}).contiguous()
            table = PackedTable(self.rows[:b], self.time[:b], None, MAX_HISTORY, True)
            advance = self._host_advance()
            if advance is None:
                ragged_step(self.y[:b], raw, self.stash[:b], self.hist[:, :b], table, step, self.backend)
            else:
                finished = advance(self.y[:b], raw, self.stash[:b], self.hist[:, :b], table, step,
                                   self.stages[:b], self.done[:b], n)
        except Exception as e:  # noqa: BLE001 - the failure belongs to the requests in this call
            log.warning("denoiser call failed for %d requests: %s", n, e)
            self._release(list(range(n)), RuntimeError(f"denoiser call failed: {_describe(e)}"))
            return 0
        self.stats["iterations"] += 1
        self.stats["padded_steps"] += b
        if advance is None:
            stepped, done, just = self._advance_host_counters(n)
        else:  # parked (finished, static) slots stay at -1; the call advanced the others
            parked = int((self.step[:n] < 0).sum()) if self.policy == "static" else 0
            stepped = n - parked
            just = self.done[:n].nonzero().flatten().tolist() if finished else []
            done = just if parked + len(just) < n else list(range(n))
        self.stats["slot_steps"] += stepped
        if self.policy == "static" and len(done) < n:
            if just:  # a static batch finishes together: finished samples wait, masked, still in the batch
                self.step[torch.tensor(just, device=self.device)] = -1
            return n
        self._release(done)
        return n

    # --------------------------------------------------------------------------------------- internals
    def _host_advance(self) -> Callable[..., int] | None:
        """The step-and-advance call of a CPU pool (C++ when the backend resolves to ``native``, else the
        torch twin); None for a device pool or the triton kernel (run interpreted on CPU)."""
        if self.device.type != "cpu":
            return None
        if self.backend == "triton":
            return None
        return ragged_step_advance_native if fused(self.backend, self.dtype) else ragged_step_advance_torch

    def _advance_host_counters(self, n: int) -> tuple[int, list[int], list[int]]:
        """After ``ragged_step`` (device pools, triton): advance ``self.step`` and the host copies of the live
        slots' counters; returns the slots stepped, the finished slots and those finished in this call."""
        live_steps = self.step[:n]
        live_steps += (live_steps >= 0).to(torch.int32)  # parked (finished, static) slots stay at -1
        stepped, done, just = 0, [], []
        for i, live in enumerate(self.live):
            if live.step < live.stages:
                live.step += 1
                stepped += 1
                if live.step == live.stages:
                    just.append(i)
            if live.step >= live.stages:
                done.append(i)
        return stepped, done, just

    def _note_cancel(self, fut: Future) -> None:
        if fut.cancelled():
            self._cancel_seen = True

    def _drop_cancelled(self) -> None:
        """Free the slots of cancelled futures (scans the pool only after a cancellation was seen)."""
        if not self._cancel_seen:
            return
        self._cancel_seen = False  # cleared before the scan: a cancel during it is seen next time
        gone = [i for i, live in enumerate(self.live) if live.future.cancelled()]
        self.stats["cancelled"] += len(gone)
        self._release(gone, deliver=False)

    def _release(self, gone: list[int], error: Exception | None = None, deliver: bool = True) -> None:
        """Deliver the results (or ``error``) of slots ``gone``, then compact the pool (``SlotCompactor``:
        one C++ call on a CPU pool with the native backend, else one gather per buffer) so the remaining slots
        are at the front, and clear the freed tail."""
        if not gone:
            return
        n = len(self.live)
        if deliver:
            if error is None:
                rows = self.y[torch.tensor(gone, device=self.device)]
                finite = torch.isfinite(rows.flatten(1)).all(1).tolist()  # nothing non-finite is a result
                results = rows.unbind(0)
            for k, i in enumerate(gone):
                fut = self.live[i].future
                if error is not None or not finite[k]:
                    self._fail(fut, error or FloatingPointError(
                        "the sample became NaN or inf (a non-finite model output, or a schedule whose scale "
                        "overflows the pool's dtype); it is not delivered"))
                    continue
                try:
                    fut.set_result(results[k])
                    self.stats["completed"] += 1
                except InvalidStateError:  # cancelled meanwhile: dropped, never delivered twice
                    self.stats["cancelled"] += 1
        drop = set(gone)
        keep = [i for i in range(n) if i not in drop]
        m = len(keep)
        if keep != list(range(m)):
            self._compact(keep)
        self.live = [self.live[i] for i in keep]
        self.y[m:n].zero_()
        self.step[m:n] = -1
        self.stages[m:n] = 0
        for k, (lo, _) in self.conditions.items():
            self.cond[k][m:n] = lo

    def _fail(self, fut: Future, error: BaseException) -> None:
        """Deliver ``error`` to ``fut``, unless it was cancelled meanwhile (then counted as cancelled)."""
        try:
            fut.set_exception(error)
            self.stats["failed"] += 1
        except InvalidStateError:  # already cancelled (counted once, here) or delivered (not again)
            if fut.cancelled():
                self.stats["cancelled"] += 1

    def _admit(self, flush: bool) -> None:
        with self._lock:
            free = self.capacity - len(self.live)
            if self.policy == "static" and (self.live or (len(self.waiting) < self.capacity and not flush)):
                return
            batch = []
            while self.waiting and len(batch) < free:
                req, fut = self.waiting.popleft()
                if not fut.cancelled():
                    batch.append((req, fut))
                else:
                    self.stats["cancelled"] += 1
        try:
            self._admit_batch(batch)
        except BaseException:  # whatever escaped, no request taken off the queue is left without an answer
            placed = {id(item.future) for item in self.live}
            for _, fut in batch:
                if not fut.done() and id(fut) not in placed:
                    self._fail(fut, RuntimeError("admission failed"))
            raise

    def _admit_batch(self, batch: list[tuple[Request, Future]]) -> None:
        """Validate, group, build tables and place ``batch`` (each failure fails its requests)."""
        groups: dict[tuple, list] = {}
        for req, fut in batch:
            try:
                req = self._choose_nfe(req, fut) if req.nfe == "auto" else req
                item = self._prepare(req)
                key = (req.solver, req.nfe, _opts_key(req.solver_opts), item[2] is not None,
                       item[3] is not None, item[1] if isinstance(item[1], tuple) else None)
            except Exception as e:  # noqa: BLE001 - bad inputs fail this request alone
                self._fail(fut, _as_value_error(e))
                continue
            groups.setdefault(key, []).append((req, fut, item))
        ready = []
        for (solver, _, opts, *_), members in groups.items():
            try:
                ready.append((members, *self._group_table(solver, {k: v for k, _, v in opts}, members)))
            except Exception as e:  # noqa: BLE001 - e.g. a solver option error: the group fails
                error = _as_value_error(e)
                for _, fut, _ in members:
                    self._fail(fut, error)
        if ready:
            try:
                self._place(ready)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: these fail, the loop goes on
                log.warning("placing %d admitted requests failed: %s", sum(len(r[0]) for r in ready), e)
                self._unplace(ready, e)

    def _initial_state(self, req: Request) -> Tensor:
        """The request's validated x_T (given, or its seed's noise scaled to sigma_max in the model family's
        coordinate, as ``teacher.initial_state``), float64 on the CPU; finite in the pool's dtype."""
        if (req.x_T is None) == (req.seed is None):
            raise ValueError("give exactly one of x_T and seed")
        if req.x_T is None:
            if isinstance(req.seed, bool) or not isinstance(req.seed, int) or req.seed < 0:
                raise ValueError(f"seed={req.seed!r} must be a non-negative int")
            noise = noise_from_seeds([req.seed], self.shape, dtype=torch.float64)[0]
            x = initial_state(noise, self.sigma_max, self.den.family)
            check_state(x[None].to(self.dtype), f"x_T (seed {req.seed} at sigma_max {self.sigma_max})")
            return x
        try:
            x = torch.as_tensor(req.x_T).detach().to("cpu", torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"x_T must be a tensor of shape {self.shape} ({e})") from e
        if tuple(x.shape) != self.shape:
            raise ValueError(f"x_T has shape {tuple(x.shape)}, this batcher serves {self.shape}")
        check_state(x[None].to(self.dtype), "x_T")
        return x

    def _conditions(self, req: Request) -> dict[str, int]:
        """The request's validated condition values (``None`` means none)."""
        cond = {} if req.cond is None else req.cond
        if not isinstance(cond, dict):
            raise ValueError(f"cond={req.cond!r} must be a dict of condition names to ints")
        for k, v in cond.items():
            if k not in self.conditions:
                raise ValueError(f"unknown condition {k!r}; this batcher takes {sorted(self.conditions)}")
            lo, hi = self.conditions[k]
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
                raise ValueError(f"condition {k}={v!r} must be an int in [{lo}, {hi})")
        return dict(cond)

    def _choose_nfe(self, req: Request, fut: Future) -> Request:
        """``req`` with the NFE the chooser picks from its x_T (and condition), also set as ``fut.nfe``."""
        if self.chooser is None:
            raise ValueError("nfe='auto' needs a batcher built with an NFE chooser (chooser=NFEChooser(...))")
        x = self._initial_state(req)
        c = self._conditions(req).get(self.predictor_cond) if self.predictor_cond else None
        fut.nfe = self.chooser(x.to(self.device, torch.float32)[None],
                               None if c is None else torch.tensor([c], device=self.device))[0]
        return replace(req, nfe=fut.nfe)

    def _prepare(self, req: Request) -> tuple[Tensor, Tensor | tuple, Tensor | None, Tensor | None,
                                              dict[str, int]]:
        """Validate one request: (x_T, grid [N+1] or a cached table's key, shift, scale, cond) in float64.
        The NFE bound comes first, before anything of the request's size is built."""
        if isinstance(req.nfe, bool) or not isinstance(req.nfe, int) or not 1 <= req.nfe <= self.max_stages:
            raise ValueError(f"nfe={req.nfe!r} must be an int in [1, {self.max_stages}] (this batcher's "
                             "max_stages)")
        x = self._initial_state(req)
        cond = self._conditions(req)
        check_solver(req.solver, req.solver_opts)
        sched = req.schedule
        if isinstance(sched, str) and sched in HEURISTICS:  # the same table for every such request: cached
            key = (req.solver, req.nfe, sched, _opts_key(req.solver_opts))
            if key not in self._tables:
                grid = get_sigmas(sched, req.nfe, self.sigma_min, self.sigma_max, family=self.den.family)
                check_schedule(self.den, grid[None], None, None, self.dtype, req.solver)
                self._tables[key] = self._table(req.solver, req.solver_opts, grid[None], None, None)
            return x, key, None, None, cond
        if isinstance(sched, str) and sched == "predictor":
            phi = self.predictors.get((req.nfe, req.solver))
            if phi is None:
                raise ValueError(f"no predictor for NFE {req.nfe} and {req.solver}; "
                                 f"have {sorted(self.predictors)}")
            c = cond.get(self.predictor_cond) if self.predictor_cond else None
            with torch.no_grad():
                sched = phi(x.to(self.device, torch.float32)[None],
                            None if c is None else torch.tensor([c], device=self.device))
        if isinstance(sched, str):
            raise ValueError(f"schedule={sched!r}: use a heuristic {HEURISTICS}, 'predictor' or a grid")
        if isinstance(sched, Schedule):
            sched = Schedule(*(None if v is None else v.detach().to("cpu", torch.float64).reshape(1, -1)
                               for v in (sched.grid, sched.shift, sched.scale)))
        else:
            try:
                sched = torch.as_tensor(sched).detach().to("cpu", torch.float64).reshape(-1)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"schedule must be a heuristic name, 'predictor', a grid [N+1] or a "
                                 f"Schedule, got {type(sched).__name__}") from e
        grid, shift, scale = check_inputs(self.den, x[None].to(self.dtype), sched, req.solver,
                                          solver_opts=req.solver_opts)
        if grid.shape[-1] != req.nfe + 1:
            raise ValueError(f"the grid has {grid.shape[-1]} points; NFE {req.nfe} needs {req.nfe + 1}")
        if torch.isinf(grid[:, 0]).any():
            raise ValueError("a grid starting at sigma = inf (a flow model's t = 1) is not served here; "
                             "start at a finite sigma_max")
        return x, grid[0], *(None if v is None else v[0] for v in (shift, scale)), cond

    def _table(self, solver: str, opts: dict, grids: Tensor, shift: Tensor | None,
               scale: Tensor | None) -> tuple[Tensor, Tensor, int]:
        """Coefficient rows ``[g, max_stages, R]`` laid out for the pool (history padded to MAX_HISTORY,
        rows past the S stages zero), the network times ``[g, max_stages]`` and S, for ``g`` grids of one
        solver."""
        table = build_table(solver, grids, self.den.family, prediction=self.den.prediction, shift=shift,
                            scale=scale, **opts)
        if table.history > MAX_HISTORY or table.nfe > self.max_stages:
            raise ValueError(f"{solver} with these options needs {table.nfe} stages and {table.history} "
                             f"history slots; this batcher holds {self.max_stages} and {MAX_HISTORY}")
        if table.scaled_input:
            raise ValueError("shift on a VP/flow model (a rescaled network input) is not served here")
        g, s, w = grids.shape[0], table.nfe, 3 + table.history
        wide = 3 + MAX_HISTORY
        rows = torch.zeros(g, self.max_stages, 2 + 2 * wide, dtype=torch.float64)
        rows[:, :s, :2] = table.conv
        rows[:, :s, 2:2 + w] = table.coef[:, :, 0]
        rows[:, :s, 2 + wide:2 + wide + w] = table.coef[:, :, 1]
        time = torch.zeros(g, self.max_stages, dtype=self.dtype)
        time[:, :s] = self.den.time(table.sigma_eval).to(self.dtype)
        return rows.to(self.device, self.rows.dtype), time.to(self.device), s

    def _group_table(self, solver: str, opts: dict, members: list) -> tuple[Tensor, Tensor, int]:
        """A group's tables: the cached heuristic one (expanded) or theirs, built together (a group's members
        all have a shift, or none does; the same for the scale: both are part of the group key)."""
        first = members[0][2][1]
        if isinstance(first, tuple):  # a cached heuristic table, shared by the whole group
            rows, time, s = self._tables[first]
            return rows.expand(len(members), -1, -1), time.expand(len(members), -1), s
        stack = [torch.stack([m[2][k] for m in members]) if members[0][2][k] is not None else None
                 for k in (1, 2, 3)]
        return self._table(solver, opts, *stack)

    def _unplace(self, ready: list[tuple[list, Tensor, Tensor, int]], error: Exception) -> None:
        """A failed placement (``_place`` adds to ``live`` only after its writes): its requests fail with
        ``error`` and the slots it may have half-written are freed."""
        failure = RuntimeError(f"admission failed: {_describe(error)}")
        for members, *_ in ready:  # answers first: freeing the slots touches the (maybe broken) device
            for _, fut, _ in members:
                self._fail(fut, failure)
        n, g = len(self.live), sum(len(r[0]) for r in ready)
        self.step[n:n + g] = -1
        self.stages[n:n + g] = 0

    def _place(self, ready: list[tuple[list, Tensor, Tensor, int]]) -> None:
        """Write the admitted groups' states and tables into the next free slots: one write per buffer."""
        members = [m for group, *_ in ready for m in group]
        stages = [s for group, _, _, s in ready for _ in group]
        g = len(members)
        slots = slice(len(self.live), len(self.live) + g)
        self.y[slots] = torch.stack([m[2][0] for m in members]).to(self.device, self.dtype)
        for buf, k in ((self.rows, 1), (self.time, 2)):
            parts = [r[k] for r in ready]
            buf[slots] = parts[0] if len(parts) == 1 else torch.cat(parts)
        self.step[slots] = 0
        self.stages[slots] = torch.tensor(stages)
        for k, (lo, _) in self.conditions.items():
            self.cond[k][slots] = torch.tensor([m[2][4].get(k, lo) for m in members], device=self.device)
        for (_, fut, _), s in zip(members, stages, strict=True):
            self.live.append(_Live(fut, s))
            fut.add_done_callback(self._note_cancel)  # runs at once if it was cancelled meanwhile
        self.stats["admitted"] += g
