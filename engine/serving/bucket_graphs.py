"""CUDA graphs for a continuous batcher: one graph per bucket size of a device pool's iteration.

A batcher iteration's device work -- the denoiser call on ``pool[:b]`` with each slot's own network time,
the fused ragged step and the counters' advance (``SlotPool.step_device``) -- reads and writes only the
pool's static buffers, whose addresses never change (admission writes into them, retirement compacts them
in place). So each bucket size ``b`` is captured once and replayed every iteration that runs it; the
condition inputs and guidance are the pool's own buffers, so a batcher has one condition signature. The
host keeps its own copies of the counters and reads nothing back.

Capture runs the body on a side stream first (``warmup`` times: Triton compiles, library handles); that
advances the slots' state, so the buffers the body writes are saved before and restored after every run
(also one that fails). Capture (``engine.core.graphs.capture_graph``) runs on a stream of its own with
``capture_error_mode="thread_local"``, so another thread's CUDA calls (a client reading a result) do not break
it; a failed capture raises ``CaptureError`` with the bucket named (the iteration's requests fail; use
``graphs=False`` for a model that cannot be captured) and, unless it ran out of memory, is remembered: that
bucket fails at once, without capturing again, until :meth:`BucketGraphs.invalidate` (an error of the warm-up
fails the iteration as an eager one would, and is not remembered). A moved parameter storage or a changed
module tree of the denoiser -- when the model is an ``nn.Module`` or a ``Denoiser`` of one
(``engine.core.graphs.ParameterWatch``) -- drops every graph (and every remembered failure); a plain
function's modules are not visible, so after replacing what it reads call :meth:`invalidate`.

On a pool that is not on CUDA nothing is captured: the same body runs eagerly (which keeps this path testable
without a GPU; :meth:`BucketGraphs.warm_up` runs on any device).
"""

from __future__ import annotations

import torch

from indis.engine.core.families import Denoiser
from indis.engine.core.graphs import CaptureError, ParameterWatch, capture_graph, warm_up
from indis.engine.serving.pool import SlotPool


class BucketGraphs:
    """One CUDA graph per bucket of ``pool``'s iteration with ``den`` (see the module docstring);
    ``replay(b)`` runs slots ``0..b-1``. The pool must step on the device (no C++/torch stepper: a CUDA
    pool, or the triton backend)."""

    def __init__(self, pool: SlotPool, den: Denoiser, warmup: int = 2) -> None:
        if pool.stepper is not None:
            raise ValueError("graphs=True needs a pool that steps on the device (a CUDA device, or the "
                             "triton backend); a CPU pool steps with its C++ or torch call")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup={warmup!r} must be an int >= 1 (a capture needs an eager run first)")
        self.pool, self.den, self.warmup = pool, den, warmup
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.failed: dict[int, str] = {}  # buckets whose capture failed: why (until invalidate)
        self.captured = 0  # graphs captured so far (re-captures included)
        self._watch = ParameterWatch()
        self._signature = self._watch.signature(den)
        self._memory = None  # the graphs share one memory pool, and so one capture stream
        self._stream: torch.cuda.Stream | None = None

    def invalidate(self) -> None:
        """Drop every graph and every remembered capture failure (the next replay of each bucket captures
        again)."""
        self.graphs.clear()
        self.failed.clear()

    def replay(self, b: int) -> None:
        """Run the iteration of slots ``0..b-1`` (capturing its graph first if needed). A bucket whose
        capture failed raises again at once, without another capture, until :meth:`invalidate`."""
        pool = self.pool
        if pool.device.type != "cuda":
            pool.step_device(self.den, b)
            return
        signature = self._watch.signature(self.den)
        if signature != self._signature:  # a parameter's storage moved or the model changed: stale graphs
            self.invalidate()
            self._signature = signature
        if b in self.failed:
            raise CaptureError(self.failed[b])
        with torch.cuda.device(pool.device):
            graph = self.graphs.get(b)
            if graph is None:
                graph = self.graphs[b] = self._capture(b)
            graph.replay()

    def warm_up(self, b: int) -> None:
        """Run bucket ``b``'s iteration ``warmup`` times, as a capture does first (Triton compiles, library
        handles are made), restoring the buffers it writes after each run: the pool is left as it was (a
        slot at its last stage would otherwise step past its table on the second run). Runs on any
        device."""
        pool = self.pool
        written = [pool.y[:b], pool.stash[:b], pool.hist[:, :b], pool.step[:b]]
        saved = [t.clone() for t in written]

        def reset() -> None:
            for t, s in zip(written, saved, strict=True):
                t.copy_(s)

        warm_up(lambda: pool.step_device(self.den, b), self.warmup, reset)

    def _capture(self, b: int) -> torch.cuda.CUDAGraph:
        if self._memory is None:
            self._memory = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device=self.pool.device)
        def warm() -> None:
            self.warm_up(b)
            signature = self._watch.signature(self.den)  # a warm-up may register a model's lazy buffers:
            if signature != self._signature:              # the graphs captured before may read moved memory
                self.graphs.clear()
                self._signature = signature

        try:
            graph, _ = capture_graph(lambda: self.pool.step_device(self.den, b), self.pool.device, warm,
                                     self._memory, self._stream)
            if self._watch.signature(self.den) != self._signature:
                raise CaptureError("the model moved its parameters or changed its modules while it ran (e.g. "
                                   "CPU offload hooks): the graph would read memory it does not own")
        except CaptureError as e:  # (a warm-up error propagates as the eager iteration's would)
            self._memory = None  # later captures use a new pool: a failed one may still be recording
            cause = e.__cause__ or e
            message = (f"capturing bucket {b}'s iteration as a CUDA graph failed ({type(cause).__name__}: "
                       f"{cause}); a model that cannot be captured is served with graphs=False")
            if not isinstance(cause, torch.OutOfMemoryError):  # out of memory may pass: try again
                self.failed[b] = message
            raise CaptureError(message) from cause
        self.captured += 1
        return graph
