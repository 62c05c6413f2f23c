"""The slot pool on its own: place, step with each slot's own counter, park, remove (compaction), reset."""

from __future__ import annotations

import pytest
import torch

import indis
from indis.engine.core.families import as_denoiser
from indis.engine.core.sampling import pool_layout, table_for
from indis.engine.serving.pool import MAX_HISTORY, Block, SlotPool
from indis.engine.studies.convergence import small_mixture

DEN = as_denoiser(small_mixture())


def _pool(capacity: int = 4, labels: bool = False, host: bool | None = None) -> SlotPool:
    """A float64 CPU pool; with ``labels`` it holds a class-label condition (idle value -1) -- the mixture
    here takes none, so such a pool is not stepped; ``host``: as ``SlotPool``'s."""
    return SlotPool(capacity, (6,), max_stages=8, conditions={"class_labels": -1} if labels else {},
                    device=torch.device("cpu"), dtype=torch.float64, backend="torch", host=host)


def _layout(nfe: int, solver: str = "ipndm") -> tuple[torch.Tensor, torch.Tensor, int]:
    grid = indis.get_sigmas("edm", nfe, 0.002, 80.0)[None]
    table = table_for(DEN, grid, solver, torch.float64)
    rows, time = pool_layout(DEN, table, torch.float64, 8, MAX_HISTORY)
    return rows, time, table.nfe


def _fill(pool: SlotPool, nfes: list[int]) -> None:
    for k, nfe in enumerate(nfes):
        rows, time, s = _layout(nfe)
        x = torch.full((1, 6), float(k + 1))
        cond = {"class_labels": [k]} if pool.cond else {}
        pool.place([f"r{k}"], x, [Block(1, rows, time, s)], cond)


def test_place_fills_the_next_slots_and_bucket_inputs_read_each_slots_stage() -> None:
    pool = _pool(labels=True)
    _fill(pool, [3, 5])
    assert pool.n == 2 and pool.free == 2 and pool.owners == ["r0", "r1"]
    assert pool.y[:2, 0].tolist() == [1.0, 2.0] and pool.stages[:2].tolist() == [3, 5]
    assert pool.step.tolist() == [0, 0, -1, -1] and pool.cond["class_labels"].tolist() == [0, 1, -1, -1]
    pool.step[1] = 2
    y, sigma, cond = pool.bucket_inputs(4)
    assert sigma[:2].tolist() == [pool.time[0, 0].item(), pool.time[1, 2].item()]
    assert y.shape == (4, 6) and cond["class_labels"].tolist() == [0, 1, -1, -1]


@pytest.mark.parametrize("host_counters", [False, True])
def test_step_slots_advances_each_slot_to_its_own_stage_count(host_counters: bool) -> None:
    """The torch advance and the host-counter path (device pools) finish the same slots at the same step."""
    pool = _pool()
    if host_counters:
        pool.stepper = None
    _fill(pool, [2, 3, 2])
    seen = []
    for _ in range(3):
        stepped, done, just = pool.step_slots(pool.raw(DEN, 4), 4)
        seen.append((stepped, done, just))
        pool.remove(done)
    assert seen == [(3, [], []), (3, [0, 2], [0, 2]), (1, [0], [0])]
    assert pool.n == 0 and (pool.step == -1).all() and not pool.stages.any()


def test_parked_slots_are_not_stepped_and_count_as_finished() -> None:
    pool = _pool()
    _fill(pool, [2, 3])
    pool.step_slots(pool.raw(DEN, 2), 2)
    stepped, done, just = pool.step_slots(pool.raw(DEN, 2), 2)
    assert (stepped, done, just) == (2, [0], [0])
    pool.park(just)
    frozen = pool.y[0].clone()
    stepped, done, just = pool.step_slots(pool.raw(DEN, 2), 2)
    assert (stepped, done, just) == (1, [0, 1], [1]) and torch.equal(pool.y[0], frozen)


def test_remove_moves_the_rest_to_the_front_in_order_and_clears_the_tail() -> None:
    pool = _pool(labels=True)
    _fill(pool, [3, 5, 7, 4])
    before = {k: getattr(pool, k).clone() for k in ("y", "rows", "time", "stages")}
    pool.remove([0, 2])
    assert pool.owners == ["r1", "r3"] and pool.stages[:2].tolist() == [5, 4]
    for k, t in before.items():
        assert torch.equal(getattr(pool, k)[:2], t[[1, 3]]), k
    assert not pool.y[2:].any() and (pool.step[2:] == -1).all() and not pool.stages[2:].any()
    assert pool.cond["class_labels"].tolist() == [1, 3, -1, -1]


def test_a_failed_place_leaves_the_slots_free_and_reset_returns_the_owners() -> None:
    pool = _pool()
    _fill(pool, [3])
    rows, time, s = _layout(5)
    with pytest.raises((RuntimeError, ValueError)):  # torch or numpy refuses the write
        pool.place(["bad"], torch.zeros(1, 7), [Block(1, rows, time, s)], {})  # a state of the wrong shape
    assert pool.n == 1 and pool.owners == ["r0"]
    assert pool.reset() == ["r0"] and pool.n == 0 and (pool.step == -1).all()


def test_pool_layout_steps_like_the_packed_table() -> None:
    """The pool's padded rows (max_stages, MAX_HISTORY) step a sample exactly as the unpadded packed table of
    ``indis.sample``'s fused loop does."""
    x = torch.randn(1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    grid = indis.get_sigmas("edm", 5, 0.002, 80.0)
    want = indis.sample(DEN, x, grid, "unipc", backend="torch")
    pool = _pool(capacity=1)
    table = table_for(DEN, grid[None], "unipc", torch.float64)
    rows, time = pool_layout(DEN, table, torch.float64, 8, MAX_HISTORY)
    pool.place(["x"], x, [Block(1, rows, time, table.nfe)], {})
    for _ in range(table.nfe):
        pool.step_slots(pool.raw(DEN, 1), 1)
    torch.testing.assert_close(pool.y[0], want[0], rtol=0, atol=1e-12)


def test_pool_layout_refuses_a_table_the_pool_cannot_hold() -> None:
    table = table_for(DEN, indis.get_sigmas("edm", 9, 0.002, 80.0)[None], "ipndm", torch.float64)
    with pytest.raises(ValueError, match="needs 9 stages"):
        pool_layout(DEN, table, torch.float64, 8, MAX_HISTORY)


def test_numpy_bookkeeping_equals_the_torch_one() -> None:
    """The same places, steps, parks, removals and reads on a pool whose bookkeeping goes through numpy
    views and on one that writes the tensors (a device pool's path) leave every buffer bit-identical."""
    pools = [_pool(capacity=6, labels=True, host=True), _pool(capacity=6, labels=True, host=False)]
    seen = []
    for pool in pools:
        assert pool.host == (pool is pools[0])
        _fill(pool, [2, 3, 4, 5])
        out = []
        for it in range(4):
            y, sigma, cond = pool.bucket_inputs(6)
            out.append((y.clone(), sigma.clone(), cond["class_labels"].clone()))
            pool.y[:6] = pool.y[:6] * 0.5 + sigma[:, None] * 1e-3  # a stand-in for the step
            pool.step[:pool.n] += (pool.step[:pool.n] >= 0).int()
            if it == 1:
                pool.park([1])
            if it == 2:
                taken = pool.take([0, 2])
                assert taken.ready()
                out.append((torch.stack(taken.rows), torch.tensor(taken.finite())))
                pool.remove([0, 2])
                _fill(pool, [3])
        out += [(t.clone(),) for t in (pool.y, pool.rows, pool.time, pool.step, pool.stages,
                                       pool.cond["class_labels"])]
        seen.append(out)
    for a, b in zip(*seen, strict=True):
        for u, v in zip(a, b, strict=True):
            assert u.dtype == v.dtype and torch.equal(u, v)
    with pytest.raises(ValueError, match="host=True"):
        SlotPool(2, (6,), max_stages=8, conditions={}, device=torch.device("cpu"), dtype=torch.bfloat16,
                 backend="torch", host=True)
