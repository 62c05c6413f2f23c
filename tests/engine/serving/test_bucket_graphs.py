"""Graph-captured serving: BucketGraphs (eager off CUDA, captured on it), the staged placement of device
pools, and results delivered one iteration late while their finiteness flags travel back."""

from __future__ import annotations

import pytest
import torch

from indis.engine.serving.batcher import ContinuousBatcher, Request
from indis.engine.serving.bucket_graphs import BucketGraphs
from indis.engine.serving.pool import Taken, staged_copy
from indis.engine.studies.convergence import small_mixture
from tests.helpers import KERNEL_DEVICE

MODEL = small_mixture()
SOLVERS = ["ipndm", "unipc", "dpmpp_2m", "heun", "euler"]


def _labelled(x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
    return MODEL.to(x.device)(x, sigma) + 0.01 * class_labels.clamp(min=0).to(x.dtype).view(-1, 1)


def _requests(count: int) -> list[Request]:
    return [Request(seed=i, nfe=[3, 5, 7][i % 3], solver=SOLVERS[i % len(SOLVERS)],
                    schedule=["edm", "logsnr"][i % 2], cond={"class_labels": i % 11 - 1})
            for i in range(count)]


def _batcher(**kw) -> ContinuousBatcher:
    kw.setdefault("capacity", 4)
    return ContinuousBatcher(_labelled, (6,), conditions={"class_labels": (-1, 10)}, **kw)


def test_staged_copy_returns_every_piece_as_it_was() -> None:
    """Mixed dtypes and odd byte counts packed into one buffer (8-byte aligned) come back equal."""
    gen = torch.Generator().manual_seed(0)
    pieces = [torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen),
              torch.arange(5), torch.tensor([True, False, True]), torch.randn(2, 3, generator=gen).half(),
              torch.randn(3, generator=gen).bfloat16(), torch.randint(0, 9, (2, 2), generator=gen).int(),
              torch.randn(4, 3, generator=gen).t()]  # a non-contiguous one
    got = staged_copy(pieces, torch.device("cpu"))
    for p, g in zip(pieces, got, strict=True):
        assert g.dtype == p.dtype and g.shape == p.shape and torch.equal(g, p)
    assert staged_copy([], torch.device("cpu")) == []


def test_bucket_graphs_refuse_a_pool_that_steps_on_the_host_or_no_warm_up() -> None:
    with pytest.raises(ValueError, match="steps on the device"):
        _batcher(backend="torch", graphs=True)
    pool = _batcher(backend="triton", device=KERNEL_DEVICE).pool
    for warmup in (0, 2.0, False):
        with pytest.raises(ValueError, match="warmup"):
            BucketGraphs(pool, MODEL, warmup=warmup)


def test_bucket_graphs_serve_as_the_plain_loop() -> None:
    """Off CUDA the graphs' body runs eagerly: a pool stepped by ``step_device`` (the triton kernel here,
    with the counters advanced on the device and on the host) serves what the torch pool serves."""
    reqs = _requests(12)
    plain = _batcher(backend="torch", dtype=torch.float32).run_all(reqs)
    graphed = _batcher(backend="triton", device=KERNEL_DEVICE, dtype=torch.float32, graphs=True)
    assert isinstance(graphed.graphs, BucketGraphs)
    out = graphed.run_all(reqs)
    for a, b in zip(plain, out, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    assert graphed.graphs.captured == (len(graphed.graphs.graphs) if KERNEL_DEVICE.type == "cuda" else 0)


def test_warm_up_starts_every_run_from_the_same_slots() -> None:
    """The capture's warm-up runs a bucket's iteration twice; each run starts from the slots as they were
    (a slot at its last stage of a table as long as the pool allows would otherwise step past it), and the
    pool is left unchanged: the request then finishes exactly as without the warm-up."""
    seen = []

    def model(x, sigma, class_labels):
        seen.append((x.clone(), sigma.clone()))
        return _labelled(x, sigma, class_labels)

    kw = dict(conditions={"class_labels": (-1, 10)}, capacity=2, max_stages=3, backend="triton",
              device=KERNEL_DEVICE, dtype=torch.float32)
    req = Request(seed=3, nfe=3, solver="ipndm", cond={"class_labels": 4})
    want = ContinuousBatcher(model, (6,), **kw).run_all([req])[0]
    b = ContinuousBatcher(model, (6,), graphs=True, **kw)
    future = b.submit(req)
    b.iterate(flush=True)
    b.iterate(flush=True)  # the slot now sits at stage 2 of 3, its table's last
    pool = b.pool
    before = [t.clone() for t in (pool.y, pool.stash, pool.hist, pool.step)]
    seen.clear()
    b.graphs.warm_up(1)
    assert len(seen) == b.graphs.warmup == 2
    for t in (0, 1):
        assert torch.equal(seen[0][t], seen[1][t])
    for t, u in zip(before, (pool.y, pool.stash, pool.hist, pool.step), strict=True):
        assert torch.equal(t, u)
    while b.pending():
        b.iterate(flush=True)
    assert torch.equal(future.result(), want)


class _LateEvent:
    """A stand-in for a CUDA event that has not passed until someone waits for it."""

    def __init__(self) -> None:
        self.passed = False

    def query(self) -> bool:
        return self.passed

    def synchronize(self) -> None:
        self.passed = True


def _late(batcher: ContinuousBatcher) -> None:
    """Make every retirement's finiteness flags arrive late, as a CUDA pool's do."""
    take = batcher.pool.take

    def late(slots: list[int]) -> Taken:
        taken = take(slots)
        return Taken(taken.rows, taken.finite(), _LateEvent())

    batcher.pool.take = late


def test_late_flags_deliver_each_result_at_the_next_iteration() -> None:
    """A retirement whose flags are still on their way is delivered by the next iteration, after that
    iteration's work: nothing is lost, nothing delivered twice, pending() counts it meanwhile."""
    reqs = _requests(10)
    want = _batcher(dtype=torch.float64).run_all(reqs)
    b = _batcher(dtype=torch.float64)
    _late(b)
    futures = [b.submit(r) for r in reqs]
    undelivered = []
    while b.pending():
        b.iterate(flush=True)
        undelivered.append(sum(len(f) for f, _ in b.taken))
        assert b.pending() >= undelivered[-1]
        assert not any(f.done() for futs, _ in b.taken for f in futs)
    assert max(undelivered) > 0 and undelivered[-1] == 0
    for f, w in zip(futures, want, strict=True):
        assert torch.equal(f.result(), w)
    assert b.stats["completed"] == len(reqs)


def test_late_results_survive_a_failing_iteration_and_a_cancel() -> None:
    """Results already taken are delivered even if the next denoiser call fails; a request cancelled while
    its result travels back is counted as cancelled, never delivered."""
    calls = {"n": 0}

    def flaky(x, sigma, class_labels):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected")
        return _labelled(x, sigma, class_labels)

    b = ContinuousBatcher(flaky, (6,), conditions={"class_labels": (-1, 10)}, capacity=2, dtype=torch.float64)
    _late(b)
    reqs = [Request(seed=i, nfe=3 if i < 2 else 5) for i in range(4)]
    futures = [b.submit(r) for r in reqs]
    for _ in range(3):
        b.iterate(flush=True)  # the first two finish at the third call; their flags are late
    assert sum(len(f) for f, _ in b.taken) == 2 and not futures[0].done()
    assert futures[1].cancel()
    b.iterate(flush=True)  # the fourth call fails: the two admitted next fail, the taken ones are delivered
    assert futures[0].result().shape == (6,)
    assert futures[1].cancelled()
    assert all(isinstance(f.exception(), RuntimeError) for f in futures[2:])
    assert b.stats["cancelled"] == 1 and b.stats["completed"] == 1 and b.pending() == 0


class _BrokenEvent(_LateEvent):
    """An event whose wait fails, as on a device that hit a sticky error."""

    def synchronize(self) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_failing_flag_read_fails_those_requests_and_loses_none() -> None:
    """When reading the late flags fails, the background loop stops and every request still gets an
    outcome (none is dropped between the queue of late results and the failure)."""
    b = _batcher(dtype=torch.float64)
    take = b.pool.take
    b.pool.take = lambda slots: Taken(take(slots).rows, [True] * len(slots), _BrokenEvent())
    b.start()
    futures = [b.submit(Request(seed=i, nfe=2 + i)) for i in range(3)]
    b.close(10)
    assert all(f.done() for f in futures) and b.pending() == 0 and not b.taken
    assert all("illegal memory access" in str(f.exception()) for f in futures)


def test_the_static_policy_delivers_late_results_while_a_batch_fills() -> None:
    """A static batch whose flags come back late is delivered while the next batch is still filling (the
    loop does not idle with results in hand)."""
    import time

    def slow(x, sigma, class_labels):
        time.sleep(0.02)
        return _labelled(x, sigma, class_labels)

    b = ContinuousBatcher(slow, (6,), conditions={"class_labels": (-1, 10)}, capacity=2, dtype=torch.float64,
                          policy="static")
    _late(b)
    b.start()
    try:
        first = [b.submit(Request(seed=i, nfe=3)) for i in range(2)]
        time.sleep(0.01)
        late = b.submit(Request(seed=7, nfe=3))  # waits for a second request to fill its batch
        for f in first:
            assert f.result(timeout=10).shape == (6,)
        assert not late.done()
    finally:
        b.close(10)
    assert late.result().shape == (6,)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (runs in benchmarks/gpu_suite.sh)")
def test_captured_buckets_serve_as_the_eager_loop_on_cuda() -> None:
    """On CUDA: one graph per bucket used, results equal to the eager device loop; a replaced parameter
    drops the graphs."""
    class Model(torch.nn.Module):  # a module, so a replaced parameter is seen (a closure's is not)
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(6, 6)

        def forward(self, x, sigma, class_labels):
            return _labelled(x, sigma, class_labels) + 1e-3 * self.net(x)

    model = Model().cuda().double()
    net = model.net

    reqs = _requests(24)
    kw = dict(conditions={"class_labels": (-1, 10)}, capacity=8, device="cuda", dtype=torch.float64)
    eager = ContinuousBatcher(model, (6,), **kw).run_all(reqs)
    graphed = ContinuousBatcher(model, (6,), graphs=True, **kw)
    out = graphed.run_all(reqs)
    for a, o in zip(eager, out, strict=True):
        torch.testing.assert_close(o, a, rtol=1e-12, atol=1e-12)
    assert graphed.graphs.captured == len(graphed.graphs.graphs) >= 2
    captured = graphed.graphs.captured
    net.weight = torch.nn.Parameter(net.weight.detach().clone())
    again = graphed.run_all(reqs[:4])
    assert graphed.graphs.captured > captured
    for a, o in zip(eager[:4], again, strict=True):
        torch.testing.assert_close(o, a, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (runs in benchmarks/gpu_suite.sh)")
def test_a_model_that_cannot_be_captured_fails_fast_on_cuda() -> None:
    """A denoiser that reads a value back (a host sync) cannot be captured: its requests fail with the bucket
    named, the caller's stream is current again, and the bucket is not captured again (no
    more warm-up calls of the model) until invalidate()."""
    calls = {"n": 0}

    def syncing(x, sigma, class_labels):
        calls["n"] += 1
        return _labelled(x, sigma, class_labels) * (sigma.max().item() > -1)

    b = ContinuousBatcher(syncing, (6,), conditions={"class_labels": (-1, 10)}, capacity=2, device="cuda",
                          dtype=torch.float32, graphs=True)
    stream = torch.cuda.current_stream()
    with pytest.raises(RuntimeError, match="capturing bucket"):
        b.run_all([Request(seed=0, nfe=3)])
    assert torch.cuda.current_stream() == stream
    assert list(b.graphs.failed) == [1] and not b.graphs.graphs
    n = calls["n"]
    with pytest.raises(RuntimeError, match="capturing bucket"):
        b.run_all([Request(seed=1, nfe=3)])
    assert calls["n"] == n
    b.graphs.invalidate()
    assert not b.graphs.failed
