"""Batching policies as objects: the continuous and static rules, names, and a user's own policy."""

from __future__ import annotations

import pytest
import torch

import indis
from indis.engine.serving.batcher import ContinuousBatcher, Request
from indis.engine.serving.policies import Continuous, Static, as_policy
from indis.engine.serving.pool import Block, SlotPool
from indis.engine.studies.convergence import small_mixture

MIXTURE = small_mixture()


def _pool(n: int, capacity: int = 4) -> SlotPool:
    pool = SlotPool(capacity, (6,), max_stages=8, conditions={}, device=torch.device("cpu"),
                    dtype=torch.float64, backend="torch")
    for k in range(n):
        pool.place([k], torch.zeros(1, 6), [Block(1, torch.zeros(1, 8, 14), torch.zeros(1, 8), 3)], {})
    return pool


def test_names_map_to_policy_objects_and_bad_ones_are_refused() -> None:
    assert isinstance(as_policy("continuous"), Continuous) and isinstance(as_policy("static"), Static)
    mine = Static()
    assert as_policy(mine) is mine
    with pytest.raises(ValueError, match="choose continuous or static"):
        as_policy("greedy")
    with pytest.raises(ValueError, match="admissible, retire"):
        as_policy(object())
    with pytest.raises(ValueError, match="instance"):
        as_policy(Static)  # the class, not an instance


def test_continuous_admits_into_every_free_slot_and_retires_at_once() -> None:
    pool = _pool(3)
    assert Continuous().admissible(pool, waiting=10, flush=False) == 1
    assert Continuous().retire(pool, [0, 2], [2]) == [0, 2] and not any(pool.parked)


def test_static_waits_for_a_full_batch_and_finishes_it_together() -> None:
    empty, busy = _pool(0), _pool(3)
    assert Static().admissible(empty, waiting=3, flush=False) == 0
    assert Static().admissible(empty, waiting=3, flush=True) == 4
    assert Static().admissible(empty, waiting=4, flush=False) == 4
    assert Static().admissible(busy, waiting=9, flush=True) == 0
    assert Static().idle(empty, waiting=2, closing=False) and not Static().idle(empty, 2, closing=True)
    assert Static().retire(busy, [1], [1]) == [] and busy.parked == [False, True, False]
    assert int(busy.step[1]) == -1
    assert Static().retire(busy, [0, 1, 2], [0, 2]) == [0, 1, 2]


class OneAtATime(Continuous):
    """A user's policy: admit at most one request per iteration."""

    name = "one-at-a-time"

    def admissible(self, pool: SlotPool, waiting: int, flush: bool) -> int:
        return min(1, pool.free)


def test_a_policy_object_drives_the_batcher_with_the_same_results() -> None:
    reqs = [Request(seed=i, nfe=(3, 5)[i % 2]) for i in range(5)]
    ours = ContinuousBatcher(MIXTURE, (6,), capacity=4, dtype=torch.float64, policy=OneAtATime())
    out = ours.run_all(reqs)
    assert ours.stats["iterations"] >= len(reqs)  # one admission per iteration at most
    for r, y in zip(reqs, out, strict=True):
        x = indis.noise_from_seeds([r.seed], (6,), dtype=torch.float64) * 80.0
        want = indis.sample(MIXTURE, x, indis.get_sigmas("edm", r.nfe, 0.002, 80.0), "ipndm")[0]
        torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)


class KeepsOne(Continuous):
    """A careless policy: never retires slot 0 while others are live (and does not park it)."""

    def retire(self, pool: SlotPool, done: list[int], just: list[int]) -> list[int]:
        return [i for i in done if i != 0 or pool.n == len(done)]


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_finished_slots_a_policy_keeps_are_parked(backend: str) -> None:
    """A slot the policy keeps after it finished is parked by the batcher: it is not stepped again (its
    result stays right) and it counts as finished, so the batch still ends."""
    from indis.kernels import native
    from indis.kernels.ragged_step import triton

    if (backend == "native" and not native.available()) or (backend == "triton" and triton is None):
        pytest.skip(f"{backend} is not available here")
    reqs = [Request(seed=i, nfe=(3, 7, 5)[i % 3]) for i in range(3)]
    b = ContinuousBatcher(MIXTURE, (6,), capacity=4, dtype=torch.float64, policy=KeepsOne(), backend=backend)
    out = b.run_all(reqs)
    for r, y in zip(reqs, out, strict=True):
        x = indis.noise_from_seeds([r.seed], (6,), dtype=torch.float64) * 80.0
        want = indis.sample(MIXTURE, x, indis.get_sigmas("edm", r.nfe, 0.002, 80.0), "ipndm")[0]
        torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)


class Broken(Continuous):
    def admissible(self, pool: SlotPool, waiting: int, flush: bool) -> int:
        raise RuntimeError("broken policy")


def test_a_failing_policy_fails_the_queue_instead_of_spinning() -> None:
    b = ContinuousBatcher(MIXTURE, (6,), capacity=2, dtype=torch.float64, policy=Broken())
    with pytest.raises(RuntimeError, match="the batching policy failed: RuntimeError: broken policy"):
        b.run_all([Request(seed=0), Request(seed=1)])
    assert not b.pending()
