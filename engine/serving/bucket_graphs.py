"""CUDA graphs for a continuous batcher: one graph per bucket size of a device pool's iteration.

A batcher iteration's device work -- the denoiser call on ``pool[:b]`` with each slot's own network time,
the fused ragged step and the counters' advance (``SlotPool.step_device``) -- reads and writes only the
pool's static buffers, whose addresses never change (admission writes into them, retirement compacts them
in place). So each bucket size ``b`` is captured once and replayed every iteration that runs it; the
condition inputs and guidance are the pool's own buffers, so a batcher has one condition signature. The
host keeps its own copies of the counters and reads nothing back.

Capture runs the body on a side stream first (``warmup`` times: Triton compiles, library handles); that
advances the slots' state, so the buffers the body writes are saved before and restored after (also when it
fails). Capture uses ``capture_error_mode="thread_local"``, so another thread's CUDA calls (a client reading a
result) do not break it; a failure raises with the bucket named (the iteration's requests fail; use
``graphs=False`` for a model that cannot be captured). A replaced parameter of the denoiser -- when the model
is an ``nn.Module`` or a ``Denoiser`` of one (``engine.core.graphs.parameter_fingerprint``) -- drops every
graph; a plain function's modules are not visible, so after replacing what it reads call :meth:`invalidate`.
On a pool that is not on CUDA nothing is captured: the same body runs eagerly (which keeps this path testable
without a GPU).
"""

from __future__ import annotations

import torch

from indis.engine.core.families import Denoiser
from indis.engine.core.graphs import parameter_fingerprint
from indis.engine.serving.pool import SlotPool


class BucketGraphs:
    """One CUDA graph per bucket of ``pool``'s iteration with ``den`` (see the module docstring);
    ``replay(b)`` runs slots ``0..b-1``. The pool must step on the device (no C++/torch stepper: a CUDA
    pool, or the triton backend)."""

    def __init__(self, pool: SlotPool, den: Denoiser, warmup: int = 2) -> None:
        if pool.stepper is not None:
            raise ValueError("graphs=True needs a pool that steps on the device (a CUDA device, or the "
                             "triton backend); a CPU pool steps with its C++ or torch call")
        self.pool, self.den, self.warmup = pool, den, warmup
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.captured = 0  # graphs captured so far (re-captures included)
        self._fingerprint = parameter_fingerprint(den.net)
        self._memory = None  # the graphs share one memory pool

    def invalidate(self) -> None:
        """Drop every graph (the next replay of each bucket captures again)."""
        self.graphs.clear()

    def replay(self, b: int) -> None:
        """Run the iteration of slots ``0..b-1`` (capturing its graph first if needed)."""
        pool = self.pool
        if pool.device.type != "cuda":
            pool.step_device(self.den, b)
            return
        fingerprint = parameter_fingerprint(self.den.net)
        if fingerprint != self._fingerprint:  # a parameter's storage was replaced: stale graphs
            self.invalidate()
            self._fingerprint = fingerprint
        with torch.cuda.device(pool.device):
            graph = self.graphs.get(b)
            if graph is None:
                graph = self.graphs[b] = self._capture(b)
            graph.replay()

    def _capture(self, b: int) -> torch.cuda.CUDAGraph:
        pool = self.pool
        written = [pool.y[:b], pool.stash[:b], pool.hist[:, :b], pool.step[:b]]
        saved = [t.clone() for t in written]
        current = torch.cuda.current_stream(pool.device)
        try:
            side = torch.cuda.Stream(device=pool.device)
            side.wait_stream(current)
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(self.warmup):
                    pool.step_device(self.den, b)
            current.wait_stream(side)
        finally:
            for t, s in zip(written, saved, strict=True):
                t.copy_(s)
        if self._memory is None:
            self._memory = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        capture = torch.cuda.graph(graph, pool=self._memory, capture_error_mode="thread_local")
        try:
            with capture, torch.no_grad():
                pool.step_device(self.den, b)
        except Exception as e:
            raise RuntimeError(f"capturing bucket {b}'s iteration as a CUDA graph failed "
                               f"({type(e).__name__}: {e}); a model that cannot be captured is served with "
                               "graphs=False") from e
        self.captured += 1
        return graph
