"""Batching policies of a continuous batcher: when to admit waiting requests and when to retire finished ones.

:class:`Continuous` admits into every free slot at every iteration and retires each sample the iteration it
finishes -- possible because each slot steps its own table. :class:`Static` is the baseline a server
without ragged solvers has: it admits a new batch only when the previous one has finished (a full one, or a
partial one on ``flush``) and runs every batch to its longest request, finished samples waiting, masked.
"""

from __future__ import annotations

from typing import Protocol

from indis.engine.serving.pool import SlotPool


class Policy(Protocol):
    name: str

    def admissible(self, pool: SlotPool, waiting: int, flush: bool) -> int:
        """How many waiting requests to admit now."""

    def retire(self, pool: SlotPool, done: list[int], just: list[int]) -> list[int]:
        """The finished slots to release after a step (``done``: all finished, ``just``: by this step); the
        batcher parks the finished slots it keeps."""

    def idle(self, pool: SlotPool, waiting: int, closing: bool) -> bool:
        """Whether a background loop should wait for more arrivals before the next iteration."""


class Continuous:
    name = "continuous"

    def admissible(self, pool: SlotPool, waiting: int, flush: bool) -> int:
        return pool.free

    def retire(self, pool: SlotPool, done: list[int], just: list[int]) -> list[int]:
        return done

    def idle(self, pool: SlotPool, waiting: int, closing: bool) -> bool:
        return False


class Static:
    name = "static"

    def admissible(self, pool: SlotPool, waiting: int, flush: bool) -> int:
        if pool.n or (waiting < pool.capacity and not flush):
            return 0
        return pool.capacity

    def retire(self, pool: SlotPool, done: list[int], just: list[int]) -> list[int]:
        if len(done) < pool.n:  # the batch finishes together: finished samples wait, masked, in the batch
            pool.park(just)
            return []
        return done

    def idle(self, pool: SlotPool, waiting: int, closing: bool) -> bool:
        return not pool.n and not closing and 0 < waiting < pool.capacity


POLICIES: dict[str, type] = {"continuous": Continuous, "static": Static}


def as_policy(policy: str | Policy) -> Policy:
    """A policy object from its name (``continuous`` or ``static``), or the object itself."""
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}: choose continuous or static (or pass a policy object)")
        return POLICIES[policy]()
    if isinstance(policy, type) or not all(callable(getattr(policy, m, None))
                                           for m in ("admissible", "retire", "idle")):
        raise ValueError(f"policy={policy!r} is neither a name nor an instance with admissible, retire "
                         "and idle")
    return policy
