"""Step-level continuous batching: samples at different steps of different grids share one denoiser call.

A :class:`ContinuousBatcher` is a loop over three parts, passing plain data:

* :class:`~indis.engine.serving.admission.Admission` turns requests into validated groups with their
  coefficient rows (the same front door as ``indis.sample``; a request whose inputs are bad fails alone,
  before it takes a slot);
* a :class:`~indis.engine.serving.pool.SlotPool` of fixed ``capacity`` owns the per-slot buffers (state,
  stash, history ring, each sample's own packed table, its stage counter -- a device tensor the fused kernel
  reads) with active samples in slots ``0..n-1``;
* a policy object (:mod:`~indis.engine.serving.policies`: ``Continuous``, ``Static``) decides when to admit
  and when to retire.

Each iteration (1) admits waiting requests into free slots, (2) runs one denoiser call on ``pool[:b]`` with
each slot's own sigma, ``b`` = the smallest bucket >= n (so compiled graphs / engine profiles are reused;
idle slots hold zeros and are masked), (3) one fused ragged step over the same slots with the counters'
advance (on a CPU pool one C++ call where the backend resolves to ``native``; a device pool keeps host copies
of the counters, no device-to-host reads; ``graphs=True``: one CUDA graph per bucket for (2) and (3)), and
(4) retires finished samples (each result is delivered exactly once; a device pool's at the next iteration,
when its finiteness flag is back), moving the remaining slots to the front.

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

import torch
from torch import Tensor

from indis.engine.core.families import Denoiser, as_denoiser
from indis.engine.serving.admission import Admission, Condition, Group, Request, TensorCondition, describe
from indis.engine.serving.allocation import NFEChooser
from indis.engine.serving.bucket_graphs import BucketGraphs
from indis.engine.serving.policies import Policy, as_policy
from indis.engine.serving.pool import Block, SlotPool, Taken
from indis.kernels.ragged_step import backend_for

log = logging.getLogger("indis.serving")

__all__ = ["ContinuousBatcher", "Request", "TensorCondition", "default_buckets"]


class _RequestFuture(Future):
    """A request's future that tells its batcher when it is cancelled (``on_cancel``), so the batcher scans
    its pool for cancelled requests only after one was; ``cancel_seen`` (set just after the cancel) lets the
    batcher's loop skip a cancelled waiting request without taking the future's lock."""

    def __init__(self, on_cancel: Callable[[], None]) -> None:
        super().__init__()
        self._on_cancel = on_cancel
        self.cancel_seen = False

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            self.cancel_seen = True
            self._on_cancel()
        return cancelled


def idle_values(conditions: dict[str, Condition]) -> dict[str, int | Tensor]:
    """What an idle slot holds per condition input: an int range's low value, zeros for a tensor input;
    ``ValueError`` for anything else."""
    out: dict[str, int | Tensor] = {}
    for k, spec in conditions.items():
        if isinstance(spec, TensorCondition):
            out[k] = torch.zeros(spec.shape, dtype=spec.dtype)
        elif (isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(v, int) for v in spec)
              and spec[0] < spec[1]):
            out[k] = spec[0]
        else:
            raise ValueError(f"conditions[{k!r}]={spec!r} must be an int range (low, high) or a "
                             f"TensorCondition(shape, dtype)")
    return out


def default_buckets(capacity: int) -> tuple[int, ...]:
    """Powers of two up to ``capacity`` (and ``capacity`` itself)."""
    out, b = [], 1
    while b < capacity:
        out.append(b)
        b *= 2
    return (*out, capacity)


class ContinuousBatcher:
    """A slot pool serving a stream of :class:`Request` (see the module docstring).

    ``conditions``: the condition inputs the model takes, by dotted path (nested inputs such as SDXL's
    ``"added_cond_kwargs.text_embeds"``): an int input with its valid range ``(low, high)`` (values outside
    fail the request alone; an idle slot, and a request that leaves it out, hold ``low``), e.g.
    ``{"class_labels": (-1, 10)}``, or a tensor input ``TensorCondition(shape, dtype)``, e.g.
    ``{"encoder_hidden_states": TensorCondition((77, 768))}`` (each request gives its own; they are stacked
    per bucket). ``guidance``: classifier-free guidance with each request's ``uncond`` and
    ``guidance_scale`` (one batched network call on ``[uncond; cond]`` unless ``guidance_batched=False``;
    ``guidance_rescale`` as in ``indis.sample``). ``graphs``: each bucket's iteration (the denoiser call, the
    fused step and the counters' advance) is one CUDA graph over the pool's static buffers
    (:class:`~indis.engine.serving.bucket_graphs.BucketGraphs`: a pool that steps on the device, i.e. CUDA or
    the triton backend; off CUDA nothing is captured and the same work runs eagerly).
    On CUDA, admission writes new slots through one pinned staging copy per iteration and a retirement's
    finiteness flags come back asynchronously: results are delivered at the next iteration, after its work
    is queued, so the host never waits for the device's current work -- except to admit a request whose
    schedule (``schedule="predictor"``) or NFE (``nfe="auto"``) a network on the device chooses: that choice
    is read back to the host once, at admission (a schedule to be checked and turned into table rows).
    ``predictors``: ``{(nfe, solver): phi}`` with ``phi(x_T[B], cond) -> Schedule`` for
    ``schedule="predictor"`` (``predictor_cond``: the dotted path of the condition it reads, or a function of
    the condition tree; an NFE ``chooser`` reads it too, for requests with ``nfe="auto"``). ``policy``:
    ``"continuous"``, ``"static"`` or a policy object (``indis.engine.serving.policies``).
    """

    def __init__(self, model: Callable[..., Tensor] | Denoiser, shape: Sequence[int], *, capacity: int = 32,
                 buckets: Sequence[int] | None = None, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 predictors: dict[tuple[int, str], Callable] | None = None,
                 predictor_cond: str | Callable | None = None, chooser: NFEChooser | None = None,
                 conditions: dict[str, Condition] | None = None, max_stages: int = 16,
                 max_waiting: int = 100_000, policy: str | Policy = "continuous",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 backend: str | None = None, guidance: bool = False, guidance_rescale: float = 0.0,
                 guidance_batched: bool = True, graphs: bool = False) -> None:
        self.policy = as_policy(policy)
        self.den = as_denoiser(model)
        self.shape, self.capacity = tuple(shape), capacity
        self.buckets = tuple(sorted(set(buckets or default_buckets(capacity))))
        if self.buckets[-1] != capacity or self.buckets[0] < 1:
            raise ValueError(f"buckets {self.buckets} must be positive and end at the capacity {capacity}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype}: the pool holds samples in a floating-point dtype (float16, "
                             f"bfloat16, float32 or float64)")
        self._bucket_of = [next(b for b in self.buckets if b >= n) for n in range(capacity + 1)]
        self.max_waiting = max_waiting
        self.device, self.dtype = torch.device(device), dtype
        self.backend = backend_for(self.device, backend)
        conditions = dict(conditions or {})
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale={guidance_rescale!r} must lie in [0, 1]")
        if guidance and not conditions:
            raise ValueError("guidance needs the condition inputs it guides (conditions=...)")
        self.pool = SlotPool(capacity, self.shape, max_stages=max_stages, conditions=idle_values(conditions),
                             device=self.device, dtype=dtype, backend=self.backend,
                             guidance=(float(guidance_rescale), guidance_batched) if guidance else None)
        self.admission = Admission(self.den, self.shape, sigma_min=sigma_min, sigma_max=sigma_max,
                                   predictors=dict(predictors or {}), predictor_cond=predictor_cond,
                                   chooser=chooser, conditions=conditions, max_stages=max_stages,
                                   device=self.device, dtype=dtype, coef_dtype=self.pool.coef_dtype,
                                   guidance=guidance)
        self.graphs = BucketGraphs(self.pool, self.den) if graphs else None
        self.waiting: deque[tuple[Request, Future]] = deque()
        self.taken: list[tuple[list[Future], Taken]] = []  # retired, not delivered yet (device pools)
        self.stats = {"iterations": 0, "admitted": 0, "completed": 0, "failed": 0, "cancelled": 0,
                      "slot_steps": 0, "padded_steps": 0}
        self._cancel_seen = False  # set by any request's future when it is cancelled
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._driver = threading.Lock()  # held by the one loop that drives this batcher
        self._owner: threading.Thread | None = None
        self._closing = False

    @property
    def live(self) -> list[Future]:
        """The active requests' futures, slot by slot."""
        return self.pool.owners

    # ------------------------------------------------------------------------------------------- front
    def submit(self, request: Request) -> Future:
        """Queue a request; its future gets the sample ``[*shape]`` (or the reason it failed)."""
        fut = _RequestFuture(self._note_cancel)
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
            with torch.no_grad():  # serving never differentiates: no graph on the pool's buffers
                while self.pending():
                    self._guarded_iterate(flush=True)
        finally:
            self._undrive()
        return [f.result() for f in futures]

    def pending(self) -> int:
        with self._lock:
            return len(self.waiting) + len(self.live) + sum(len(f) for f, _ in self.taken)

    def start(self) -> None:
        """Run the loop in a background thread (``submit`` from any thread; ``close`` to stop)."""
        if self._closing:
            raise RuntimeError("this batcher is closed")
        self._drive()

        def loop() -> None:
            torch.set_grad_enabled(False)  # this thread's grad mode: serving never differentiates
            try:
                while True:
                    with self._lock:
                        while not self.waiting and not self.live and not self.taken and not self._closing:
                            self._lock.wait()
                        if self._closing and not self.waiting and not self.live and not self.taken:
                            return
                    self._guarded_iterate(flush=self._closing)
                    with self._lock:  # e.g. a static batch still filling: wait for a submit or close
                        while not self.taken and self.policy.idle(self.pool, len(self.waiting),
                                                                  self._closing):
                            self._lock.wait()
            except BaseException as e:  # not an iteration's fault: the loop stops, and says so to everyone
                log.exception("batcher loop stopped")
                self._stop_everything(RuntimeError(f"batcher loop stopped: {describe(e)}"))
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
            self._fail_live(RuntimeError(f"batcher iteration failed: {describe(e)}"))
            return 0

    def _fail_live(self, error: Exception) -> None:
        """Fail every request in the pool with ``error`` and free the pool (a last resort after an
        unexpected exception; the pool's buffers are reset, not trusted)."""
        try:
            self._deliver_taken()
            self._release(list(range(len(self.live))), error)
        except Exception:  # noqa: BLE001 - the pool is beyond repair: deliver, then start it empty
            self._fail_taken(error)
            log.exception("freeing the pool failed; resetting it")
            for fut in list(self.live):  # answers first: the reset touches the (maybe broken) device
                self._fail(fut, error)
            self.pool.reset()

    def _stop_everything(self, error: Exception) -> None:
        """The loop cannot go on: refuse new requests and fail every waiting and live one with ``error``."""
        with self._lock:
            self._closing = True
            waiting, self.waiting = list(self.waiting), deque()
            live = list(self.live)
        for _, fut in waiting:
            self._fail(fut, error)
        for fut in live:
            self._fail(fut, error)
        try:  # results already taken are delivered if the device still answers
            self._deliver_taken()
        except Exception:  # noqa: BLE001 - it does not: they fail with the rest
            self._fail_taken(error)
        try:  # after the answers: the device may be what broke
            self.pool.reset()
        except Exception:  # noqa: BLE001 - nothing is served any more
            log.exception("resetting the pool failed")

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
            if not torch.is_grad_enabled():
                return self._iterate(flush)
            with torch.no_grad():  # serving never differentiates: no graph on the pool's buffers
                return self._iterate(flush)
        finally:
            self._undrive()

    def _iterate(self, flush: bool) -> int:
        """One iteration, grad mode off (the drivers turn it off)."""
        self._drop_cancelled()
        self._admit(flush)
        n = self.pool.n
        if n == 0:
            self._deliver_taken()
            return 0
        b = self._bucket_of[n]
        try:
            stepped, done, just = self.pool.iterate(self.den, b, self.graphs and self.graphs.replay)
        except Exception as e:  # noqa: BLE001 - the failure belongs to the requests in this call
            log.warning("denoiser call failed for %d requests: %s", n, e)
            self._deliver_taken()
            self._release(list(range(n)), RuntimeError(f"denoiser call failed: {describe(e)}"))
            return 0
        self._deliver_taken()  # the last iteration's results: this one's work is already queued
        self.stats["iterations"] += 1
        self.stats["padded_steps"] += b
        self.stats["slot_steps"] += stepped
        retired = self.policy.retire(self.pool, done, just)
        kept = sorted(set(done) - set(retired))  # finished slots the policy keeps never step again
        if kept:
            parked = self.pool.parked
            self.pool.park([i for i in kept if not parked[i]])
        self._release(retired)
        return n

    # --------------------------------------------------------------------------------------- internals
    def _note_cancel(self) -> None:
        self._cancel_seen = True

    def _drop_cancelled(self) -> None:
        """Free the slots of cancelled futures (scans the pool only after a cancellation was seen)."""
        if not self._cancel_seen:
            return
        self._cancel_seen = False  # cleared before the scan: a cancel during it is seen next time
        gone = [i for i, fut in enumerate(self.live) if fut.cancelled()]
        self.stats["cancelled"] += len(gone)
        self._release(gone, deliver=False)

    def _release(self, gone: list[int], error: Exception | None = None, deliver: bool = True) -> None:
        """Deliver the results (or ``error``) of slots ``gone``, then free them (``SlotPool.remove``)."""
        if not gone:
            return
        futures = [self.live[i] for i in gone]
        if deliver and error is not None:
            for fut in futures:
                self._fail(fut, error)
        taken = self.pool.take(gone) if deliver and error is None else None
        if taken is not None:  # delivered or queued before the slots go, so pending() never undercounts
            if taken.ready():
                self._deliver(futures, taken)
            else:
                with self._lock:
                    self.taken.append((futures, taken))
        self.pool.remove(gone)

    def _deliver(self, futures: list[Future], taken: Taken) -> None:
        """Each future gets its sample, or ``FloatingPointError`` if it is not finite."""
        for fut, row, finite in zip(futures, taken.rows, taken.finite(), strict=True):
            if not finite:
                self._fail(fut, FloatingPointError(
                    "the sample became NaN or inf (a non-finite model output, or a schedule whose scale "
                    "overflows the pool's dtype); it is not delivered"))
                continue
            try:
                fut.set_result(row)
                self.stats["completed"] += 1
            except InvalidStateError:  # cancelled meanwhile: dropped, never delivered twice
                self.stats["cancelled"] += 1

    def _deliver_taken(self) -> None:
        """Deliver the results retired earlier whose finiteness flags were still on their way."""
        while self.taken:
            futures, taken = self.taken[0]
            self._deliver(futures, taken)  # if reading the flags fails, they stay for _fail_taken
            with self._lock:
                self.taken.pop(0)

    def _fail_taken(self, error: Exception) -> None:
        """Fail the results not delivered yet (the device that holds them may be what broke)."""
        with self._lock:
            taken, self.taken = self.taken, []
        for futures, _ in taken:
            for fut in futures:
                self._fail(fut, error)

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
            try:
                room = min(self.pool.free, int(self.policy.admissible(self.pool, len(self.waiting), flush)))
            except Exception as e:  # a broken policy: the queue fails now rather than waiting forever
                waiting, self.waiting = list(self.waiting), deque()
                for _, fut in waiting:
                    self._fail(fut, RuntimeError(f"the batching policy failed: {describe(e)}"))
                raise
            batch = []
            while self.waiting and len(batch) < room:
                req, fut = self.waiting.popleft()
                if not fut.cancel_seen:  # one cancelled just now is placed, then dropped (_drop_cancelled)
                    batch.append((req, fut))
                else:
                    self.stats["cancelled"] += 1
        if not batch:
            return
        try:
            self._admit_batch(batch)
        except BaseException:  # whatever escaped, no request taken off the queue is left without an answer
            placed = {id(fut) for fut in self.live}
            for _, fut in batch:
                if not fut.done() and id(fut) not in placed:
                    self._fail(fut, RuntimeError("admission failed"))
            raise

    def _admit_batch(self, batch: list[tuple[Request, Future]]) -> None:
        """Admission's groups into the pool; each failure fails its requests."""
        ready, failed = self.admission.admit(batch, on_nfe=lambda fut, nfe: setattr(fut, "nfe", nfe))
        for fut, error in failed:
            self._fail(fut, error)
        if not ready:
            return
        try:
            self._place(ready)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: these fail, the loop goes on
            log.warning("placing %d admitted requests failed: %s", sum(len(g.owners) for g in ready), e)
            self._unplace(ready, e)

    def _place(self, ready: list[Group]) -> None:
        """Write the admitted groups into the next free slots, one write per buffer (``SlotPool.place``)."""
        members = [m for g in ready for m in g.members]
        owners = [fut for g in ready for fut in g.owners]
        cond = {k: torch.stack([m.cond[k] for m in members]) for k in self.pool.idle_cond}
        uncond = scale = None
        if self.pool.guidance is not None:
            uncond = {k: torch.stack([m.uncond[k] for m in members]) for k in self.pool.idle_cond}
            scale = torch.tensor([m.guidance_scale for m in members], dtype=torch.float64)
        blocks = [Block(len(g.owners), g.rows, g.time, g.stages) for g in ready]
        self.pool.place(owners, torch.stack([m.x_T for m in members]), blocks, cond, uncond, scale)
        self.stats["admitted"] += len(owners)

    def _unplace(self, ready: list[Group], error: Exception) -> None:
        """A failed placement (``SlotPool.place`` counts the slots as active only after every write): its
        requests fail with ``error`` and the slots it may have half-written are freed."""
        failure = RuntimeError(f"admission failed: {describe(error)}")
        owners = [fut for group in ready for fut in group.owners]
        for fut in owners:  # answers first: freeing the slots touches the (maybe broken) device
            self._fail(fut, failure)
        n = self.pool.n
        self.pool.clear(n, min(n + len(owners), self.capacity))
