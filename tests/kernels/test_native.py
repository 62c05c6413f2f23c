"""The optional C++ step (indis_native) against its torch reference, and whole sampling loops through it.

CPU only. Skipped (with the loader's reason) where the extension is not built: ``.ci/build_native.sh``.
float32 results are expected to equal the reference's (same summation order, no fused multiply-adds); the
comparisons allow float32 rounding all the same, except for the step-and-advance call, which a continuous
batcher relies on to serve the same samples with or without the extension (compared bit for bit).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import indis
from indis.engine.core.sampling import run_fused, run_table
from indis.engine.core.solvers import SolverTable
from indis.engine.serving.batcher import ContinuousBatcher, Request
from indis.engine.studies.convergence import small_mixture
from indis.kernels import native
from indis.kernels.ragged_step import PackedTable, pack_table, ragged_step_torch
from tests.helpers import IDS, SOLVER_CASES, loop_case
from tests.helpers import kernel_buffers as _buffers
from tests.helpers import kernel_table as _table

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}  # relative to max |reference|
needs_native = pytest.mark.skipif(not native.available(), reason=native.REASON)


def _case(solver: str, opts: dict, bsz: int, dtype: torch.dtype) -> tuple[PackedTable, SolverTable]:
    """The packed table on the CPU (for ``dtype`` storage) and the table it came from."""
    table, time = _table(solver, opts, bsz)
    packed = pack_table(table, time, dtype)
    cpu = {"rows": packed.rows.cpu(), "time": packed.time.cpu(),
           "in_scale": None if packed.in_scale is None else packed.in_scale.cpu()}
    return dataclasses.replace(packed, **cpu), table


def _cpu_buffers(table: SolverTable, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> dict:
    return {k: None if v is None else v.to(CPU, dtype) for k, v in _buffers(table, shape, seed).items()}


def _apply(fn, packed: PackedTable, buffers: dict, step: torch.Tensor, **kw) -> dict:
    out = {k: None if v is None else v.clone() for k, v in buffers.items()}
    fn(out["y"], out["raw"], out["stash"], out["hist"], packed, step, **kw)
    return out


def _assert_match(got: dict, ref: dict, dtype: torch.dtype) -> None:
    for name, r in ref.items():
        if r is None:
            continue
        scale = float(r[torch.isfinite(r)].abs().max()) if torch.isfinite(r).any() else 1.0
        torch.testing.assert_close(got[name], r, rtol=TOL[dtype], atol=TOL[dtype] * scale, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_unavailable_is_explained() -> None:
    """Without the extension: a reason, and a call that raises it; with it: no reason."""
    assert native.available() == (native.REASON == "")
    if not native.available():
        with pytest.raises(RuntimeError, match="indis_native"):
            native.ragged_step_native(torch.zeros(1, 2), torch.zeros(1, 2), None, None, None, torch.zeros(1))
        with pytest.raises(RuntimeError, match="indis_native"):
            native.ragged_step_advance_native(torch.zeros(1, 2), torch.zeros(1, 2), None, None, None,
                                              torch.zeros(1), torch.ones(1, dtype=torch.int64),
                                              torch.zeros(1, dtype=torch.bool), 1)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("solver", "opts"), SOLVER_CASES, ids=IDS)
def test_native_matches_reference_on_a_ragged_batch(solver: str, opts: dict, dtype: torch.dtype) -> None:
    """Random stages, finished/idle samples (-1, S, S+2), odd sizes (tails of tiles, chunks), 1-2 threads."""
    bsz = 7
    packed, table = _case(solver, opts, bsz, dtype)
    g = torch.Generator().manual_seed(3)
    step = torch.randint(0, packed.stages, (bsz,), generator=g)
    step[[1, 4, 6]] = torch.tensor([-1, packed.stages, packed.stages + 2])
    done = torch.tensor([False, True, False, False, True, False, True])
    for shape in [(37,), (3, 5, 7), (3, 11, 1009)]:
        buffers = _cpu_buffers(table, shape, seed=5, dtype=dtype)
        ref = _apply(ragged_step_torch, packed, buffers, step)
        for step_dtype in (torch.int32, torch.int64):
            for threads in (1, 2):
                out = _apply(native.ragged_step_native, packed, buffers, step.to(step_dtype), threads=threads)
                _assert_match(out, ref, dtype)
                for name in ("y", "stash"):  # finished / idle samples are not written at all
                    if out[name] is not None:
                        assert torch.equal(out[name][done], buffers[name][done])
                if out["hist"] is not None:
                    assert torch.equal(out["hist"][:, done], buffers["hist"][:, done])


@needs_native
@pytest.mark.parametrize(("solver", "opts"), SOLVER_CASES, ids=IDS)
def test_first_stage_reads_no_unwritten_slot(solver: str, opts: dict) -> None:
    """At stage 0 history and stash are NaN-poisoned: no NaN may reach the state or the written slot."""
    packed, table = _case(solver, opts, 3, torch.float32)
    buffers = _cpu_buffers(table, (4, 4001), seed=1, dtype=torch.float32)  # large enough for two threads
    for name in ("stash", "hist"):
        if buffers[name] is not None:
            buffers[name] = torch.full_like(buffers[name], float("nan"))
    step = torch.zeros(3, dtype=torch.int32)
    out = _apply(native.ragged_step_native, packed, buffers, step, threads=2)
    assert torch.isfinite(out["y"]).all()
    if out["hist"] is not None:
        assert torch.isfinite(out["hist"][0]).all()
    _assert_match(out, _apply(ragged_step_torch, packed, buffers, step), torch.float32)


@needs_native
@pytest.mark.parametrize(("solver", "opts"), SOLVER_CASES, ids=IDS)
def test_native_on_the_leading_slots_of_a_pool(solver: str, opts: dict) -> None:
    """A continuous batcher steps pool[:b] with history pool[:, :b] (slot stride of the whole pool)."""
    packed, table = _case(solver, opts, 6, torch.float32)
    pool = _cpu_buffers(table, (3, 701), seed=2, dtype=torch.float32)
    rows4 = dataclasses.replace(packed, rows=packed.rows[:4], time=packed.time[:4], in_scale=None)
    step = torch.tensor([0, 2, 1, -1], dtype=torch.int32)
    outs = []
    for fn in (native.ragged_step_native, ragged_step_torch):
        buf = {k: None if v is None else v.clone() for k, v in pool.items()}
        hist = None if buf["hist"] is None else buf["hist"][:, :4]
        assert packed.history < 2 or not hist.is_contiguous()
        stash = None if buf["stash"] is None else buf["stash"][:4]
        fn(buf["y"][:4], buf["raw"][:4], stash, hist, rows4, step)
        outs.append(buf)
    _assert_match(outs[0], outs[1], torch.float32)
    for name, v in outs[0].items():  # slots 4, 5 of the pool are untouched
        if v is not None:
            rest = (slice(None), slice(4, None)) if name == "hist" else (slice(4, None),)
            assert torch.equal(v[rest], pool[name][rest])


@needs_native
def test_broadcast_stage_index() -> None:
    """step may be an expanded scalar (stride 0), as in the fused loop."""
    packed, table = _case("unipc", {"variant": "bh2", "order": 3}, 5, torch.float32)
    buffers = _cpu_buffers(table, (2, 513), seed=4, dtype=torch.float32)
    for dtype in (torch.int32, torch.int64):
        for s in range(packed.stages):
            step = torch.arange(packed.stages, dtype=dtype)[s].expand(5)
            assert step.stride(0) == 0
            out = _apply(native.ragged_step_native, packed, buffers, step)
            _assert_match(out, _apply(ragged_step_torch, packed, buffers, step), torch.float32)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("solver", "opts"), SOLVER_CASES, ids=IDS)
def test_fused_loop_with_the_native_step(solver: str, opts: dict, dtype: torch.dtype,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """run_fused on the native backend steps every stage through the bound C++ step and equals run_table
    (float32: within its rounding)."""
    x64, plan = loop_case(solver, opts, torch.device("cpu"))
    calls = []
    bound_call = native.BoundStep.__call__

    def step(self, raw, k) -> None:
        calls.append(k)
        bound_call(self, raw, k)

    monkeypatch.setattr(native.BoundStep, "__call__", step)
    x = x64.to(dtype)
    fused = run_fused(plan(x), x, backend="native")
    assert calls == list(range(plan(x).packed.stages))
    monkeypatch.undo()
    ref = run_table(plan(x64), x64)
    if dtype == torch.float64:
        torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    else:
        torch_fp32 = run_table(plan(x), x)
        err_n, err_t = (fused.double() - ref).abs().max(), (torch_fp32.double() - ref).abs().max()
        assert err_n <= 2 * err_t + 1e-6 * ref.abs().max(), f"native {err_n:.3g} vs torch {err_t:.3g}"
        torch.testing.assert_close(fused, run_fused(plan(x), x, backend="torch"), rtol=1e-6, atol=1e-5)


@needs_native
def test_bad_inputs_are_rejected() -> None:
    packed, table = _case("ipndm", {}, 2, torch.float32)
    b = _cpu_buffers(table, (8,), seed=0, dtype=torch.float32)
    y, hist = b["y"], b["hist"]
    zeros = torch.zeros(2, dtype=torch.int32)
    step = native.ragged_step_native
    with pytest.raises(ValueError, match="raw"):
        step(y, y[:, :4], None, hist, packed, zeros)
    with pytest.raises(ValueError, match="history"):
        step(y, y.clone(), None, None, packed, zeros)
    with pytest.raises(ValueError, match="step"):
        step(y, y.clone(), None, hist, packed, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="step"):
        step(y, y.clone(), None, hist, packed, zeros.float())
    with pytest.raises(ValueError, match="float32 or float64"):
        step(y.half(), y.half(), None, hist.half(), packed, zeros)
    with pytest.raises(ValueError, match="contiguous"):
        y_t = torch.zeros(8, 2).t()
        step(y_t, y_t.clone(), None, hist, packed, zeros)
    with pytest.raises(ValueError, match="contiguous"):
        step(y, y.clone(), None, hist.transpose(1, 2).contiguous().transpose(1, 2), packed, zeros)
    with pytest.raises(ValueError, match="threads"):
        step(y, y.clone(), None, hist, packed, zeros, threads=0)


def _advance_case(stages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, own stage counts) for 8 samples: starting, finishing at S, finishing at its own count 2 < S,
    past its own count but below S (stepped, not advanced), parked (-1), past S; then two beyond a batcher's
    n_active = 6: one at a stage below S (stepped, never advanced), one idle."""
    step = torch.tensor([0, stages - 1, 1, 3, -1, stages + 2, 1, -1])
    own = torch.tensor([stages, stages, 2, 2, stages, stages, stages, 0])
    return step, own


def _advance(fn, packed: PackedTable, buffers: dict, step: torch.Tensor, own: torch.Tensor,
             done_dtype: torch.dtype, n_active: int, **kw) -> tuple[dict, torch.Tensor, torch.Tensor, int]:
    out = {k: None if v is None else v.clone() for k, v in buffers.items()}
    step, done = step.clone(), torch.ones(step.shape[0], dtype=done_dtype)  # done: every entry is written
    finished = fn(out["y"], out["raw"], out["stash"], out["hist"], packed, step, own.clone(), done, n_active,
                  **kw)
    return out, step, done, finished


@pytest.mark.parametrize("n_active", [0, 6, 8])
def test_advance_twin_counts_each_sample_to_its_own_stages(n_active: int) -> None:
    """The torch twin: the step of ragged_step_torch, then the counters (no extension needed)."""
    packed, table = _case("ipndm", {}, 8, torch.float32)
    buffers = _cpu_buffers(table, (3, 5), seed=6, dtype=torch.float32)
    step, own = _advance_case(packed.stages)
    out, new_step, done, finished = _advance(native.ragged_step_advance_torch, packed, buffers, step, own,
                                             torch.bool, n_active)
    ref = _apply(ragged_step_torch, packed, buffers, step)
    for name, r in ref.items():
        assert r is None or torch.equal(out[name], r)
    moved = (torch.arange(8) < n_active) & (step >= 0) & (step < own)
    assert torch.equal(new_step, step + moved.long())
    assert torch.equal(done, moved & (step + 1 == own))
    assert finished == int(done.sum()) == {0: 0, 6: 2, 8: 2}[n_active]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("solver", "opts"), SOLVER_CASES, ids=IDS)
def test_native_advance_equals_torch_twin_bit_for_bit(solver: str, opts: dict, dtype: torch.dtype) -> None:
    """States, history, stash, step, done and the count agree exactly: finished, parked, idle samples and
    samples beyond n_active; int32/int64 step, bool/uint8 done, 1-2 threads."""
    packed, table = _case(solver, opts, 8, dtype)
    step, own = _advance_case(packed.stages)
    twin, cpp = native.ragged_step_advance_torch, native.ragged_step_advance_native
    for shape in [(37,), (3, 11, 1009)]:
        buffers = _cpu_buffers(table, shape, seed=5, dtype=dtype)
        for n_active in (0, 6, 8):
            for step_dtype, done_dtype in ((torch.int32, torch.bool), (torch.int64, torch.uint8)):
                s = step.to(step_dtype)
                ref = _advance(twin, packed, buffers, s, own, done_dtype, n_active)
                for threads in (1, 2):
                    got = _advance(cpp, packed, buffers, s, own, done_dtype, n_active, threads=threads)
                    for name, r in ref[0].items():
                        assert r is None or torch.equal(got[0][name], r), name
                    assert got[1].dtype == step_dtype and torch.equal(got[1], ref[1])
                    assert got[2].dtype == done_dtype and torch.equal(got[2], ref[2])
                    assert got[3] == ref[3]


@needs_native
def test_advance_with_rows_the_call_converts() -> None:
    """Non-contiguous rows are copied for the call (the copy outlives it): results as with the twin."""
    packed, table = _case("unipc", {"variant": "bh2", "order": 3}, 8, torch.float32)
    strided = dataclasses.replace(packed, rows=packed.rows.transpose(0, 1).contiguous().transpose(0, 1))
    assert not strided.rows.is_contiguous()
    buffers = _cpu_buffers(table, (3, 700), seed=7, dtype=torch.float32)
    step, own = _advance_case(packed.stages)
    ref = _advance(native.ragged_step_advance_torch, packed, buffers, step, own, torch.bool, 6)
    got = _advance(native.ragged_step_advance_native, strided, buffers, step, own, torch.bool, 6)
    for name, r in ref[0].items():
        assert r is None or torch.equal(got[0][name], r), name
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2]) and got[3] == ref[3]


def test_advance_rejects_bad_inputs() -> None:
    """The twin and (where built) the C++ call check the counters alike, before anything changes."""
    packed, table = _case("ipndm", {}, 2, torch.float32)
    b = _cpu_buffers(table, (8,), seed=0, dtype=torch.float32)
    y, hist = b["y"], b["hist"]
    step, own, done = torch.zeros(2, dtype=torch.int32), torch.full((2,), 3), torch.zeros(2, dtype=torch.bool)
    cases = [("stages", dict(stages=own.int())), ("stages", dict(stages=own[:1])),
             ("done", dict(done=done.float())), ("done", dict(done=torch.zeros(3, dtype=torch.bool))),
             ("n_active", dict(n_active=3)), ("n_active", dict(n_active=-1)),
             ("step", dict(step=torch.zeros(1, dtype=torch.int32).expand(2))),
             ("done", dict(done=torch.zeros(2, 2, dtype=torch.bool)[:, 0]))]
    fns = [native.ragged_step_advance_torch] + [native.ragged_step_advance_native] * native.available()
    for fn in fns:
        for match, bad in cases:
            kw = {"step": step, "stages": own, "done": done, "n_active": 2} | bad
            with pytest.raises(ValueError, match=match):
                fn(y, y.clone(), None, hist, packed, **kw)
    assert torch.equal(step, torch.zeros(2, dtype=torch.int32))  # nothing was advanced


@pytest.mark.parametrize("use_native", [False, pytest.param(True, marks=needs_native)], ids=["torch", "cpp"])
def test_slot_stepper_steps_a_bucket_as_the_unbound_call(use_native: bool) -> None:
    """Bound once to buffers of 8 slots, a step of the first b = 6 with n_active = 5 gives what the torch
    twin gives on those slices, bit for bit, and leaves the slots beyond b as they were; a denoiser output
    that does not fit is refused before anything changes."""
    packed, table = _case("ipndm", {}, 8, torch.float32)
    buffers = _cpu_buffers(table, (3, 5), seed=3, dtype=torch.float32)
    buffers["stash"] = torch.randn(8, 3, 5, generator=torch.Generator().manual_seed(4))
    step, own = _advance_case(packed.stages)
    b, n = 6, 5
    ref = {k: v.clone() for k, v in buffers.items()}
    ref_step, ref_done = step.clone().int(), torch.zeros(8, dtype=torch.bool)
    sliced = dataclasses.replace(packed, rows=packed.rows[:b], time=packed.time[:b], uses_stash=True)
    ref_count = native.ragged_step_advance_torch(ref["y"][:b], ref["raw"][:b], ref["stash"][:b],
                                                 ref["hist"][:, :b], sliced, ref_step[:b], own[:b],
                                                 ref_done[:b], n)
    got = {k: v.clone() for k, v in buffers.items()}
    got_step, got_done = step.clone().int(), torch.zeros(8, dtype=torch.bool)
    stepper = native.SlotStepper(got["y"], got["stash"], got["hist"], packed.rows, packed.time, got_step,
                                 own, got_done, native=use_native)
    for bad in (got["raw"][:b + 1], got["raw"][:b].double(), got["raw"][:b].transpose(1, 2)):
        with pytest.raises(ValueError):
            stepper(bad, b, n)
    with pytest.raises(ValueError, match="n_active"):
        stepper(got["raw"][:b], b, b + 1)
    assert torch.equal(got["y"], buffers["y"]) and torch.equal(got_step, step.int())
    assert stepper(got["raw"][:b].contiguous(), b, n) == ref_count
    for name in ("y", "stash", "hist"):
        assert torch.equal(got[name], ref[name]), name
    assert torch.equal(got_step, ref_step) and torch.equal(got_done, ref_done)


@needs_native
@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_batcher_native_advance_equals_torch_twin(policy: str) -> None:
    """A CPU pool served by the C++ advance and by the torch twin: the same samples, stats and step
    counters, and freed slots hold no stage count."""
    model = small_mixture()
    reqs = [Request(seed=i, nfe=(3, 5, 7)[i % 3], solver=("ipndm", "unipc", "dpmpp_2m")[i % 3])
            for i in range(17)]
    runs = []
    for backend in ("native", "torch"):
        b = ContinuousBatcher(model, (6,), capacity=5, buckets=(2, 5), policy=policy, backend=backend)
        out = b.run_all(reqs)
        assert not b.pool.stages.any() and (b.pool.step == -1).all()
        runs.append((out, b.stats))
    assert runs[0][1] == runs[1][1]
    assert runs[0][1]["slot_steps"] == sum(r.nfe for r in reqs)  # each sample stepped once per stage
    for a, c in zip(runs[0][0], runs[1][0], strict=True):
        assert torch.equal(a, c)


def _slot_buffers(seed: int) -> list[tuple[torch.Tensor, int]]:
    """A pool's per-slot buffers (7 slots): float32 states, history with the slot on axis 1 (a strided
    slice of a wider pool), float64 rows, int32 / int64 counters."""
    g = torch.Generator().manual_seed(seed)
    wide_hist = torch.randn(3, 9, 2, 4, generator=g)
    return [(torch.randn(7, 2, 4, generator=g), 0), (wide_hist[:, :7], 1),
            (torch.randn(7, 5, 6, generator=g, dtype=torch.float64), 0),
            (torch.randint(-1, 9, (7,), generator=g, dtype=torch.int32), 0),
            (torch.randint(0, 9, (7,), generator=g), 0)]


@pytest.mark.parametrize("use_native", [False, pytest.param(True, marks=needs_native)])
@pytest.mark.parametrize("keep", [[1, 2, 4, 6], [0, 1, 5], [6], [], [0, 1, 2]])
def test_slot_compactor_moves_the_kept_slots_to_the_front(use_native: bool, keep: list[int]) -> None:
    buffers = _slot_buffers(seed=len(keep))
    before = [t.clone() for t, _ in buffers]
    wide_before = buffers[1][0]._base.clone()
    native.SlotCompactor(buffers, native=use_native)(keep)
    idx = torch.tensor(keep, dtype=torch.int64)
    for (t, d), old in zip(buffers, before, strict=True):
        m = len(keep)
        assert torch.equal(t.narrow(d, 0, m), old.index_select(d, idx))
        assert torch.equal(t.narrow(d, m, t.shape[d] - m), old.narrow(d, m, t.shape[d] - m))  # tail kept
    assert torch.equal(buffers[1][0]._base[:, 7:], wide_before[:, 7:])  # the pool beyond the slice untouched


@pytest.mark.parametrize("use_native", [False, pytest.param(True, marks=needs_native)])
def test_slot_compactor_rejects_bad_input(use_native: bool) -> None:
    buffers = _slot_buffers(seed=0)
    compact = native.SlotCompactor(buffers, native=use_native)
    before = [t.clone() for t, _ in buffers]
    for keep in ([2, 1], [1, 1], [0, 7], [-1, 2]):
        with pytest.raises(ValueError, match="strictly increasing"):
            compact(keep)
    for (t, _), old in zip(buffers, before, strict=True):
        assert torch.equal(t, old)  # nothing moved
    if use_native:
        with pytest.raises(ValueError, match="contiguous"):
            native.SlotCompactor([(torch.zeros(4, 6)[:, ::2], 0)], native=True)
        with pytest.raises(ValueError, match="slot axis"):
            native.SlotCompactor([(torch.zeros(4), 1)], native=True)


@pytest.mark.parametrize("use_native", [False, pytest.param(True, marks=needs_native)])
@pytest.mark.parametrize("keep, clear_to", [([1, 2, 4, 6], 7), ([0, 1, 2], 5), ([], 3), ([0, 1, 5], 3)])
def test_slot_compactor_fills_the_freed_slots(use_native: bool, keep: list[int], clear_to: int) -> None:
    """After the move, slots len(keep)..clear_to-1 of each buffer with a fill hold it (a number or one slot's
    tensor); the others, and every slot from clear_to on, keep their bytes."""
    buffers = _slot_buffers(seed=7)
    fills = [torch.full((2, 4), 0.5), None, -1.25, -1, None]
    before = [t.clone() for t, _ in buffers]
    native.SlotCompactor(buffers, native=use_native, fills=fills)(keep, clear_to)
    m, idx = len(keep), torch.tensor(keep, dtype=torch.int64)
    for (t, d), old, fill in zip(buffers, before, fills, strict=True):
        assert torch.equal(t.narrow(d, 0, m), old.index_select(d, idx))
        freed = t.narrow(d, m, clear_to - m)
        if fill is None:
            assert torch.equal(freed, old.narrow(d, m, clear_to - m))
        else:
            assert torch.equal(freed, torch.as_tensor(fill, dtype=t.dtype).expand_as(freed))
        assert torch.equal(t.narrow(d, clear_to, t.shape[d] - clear_to),
                           old.narrow(d, clear_to, t.shape[d] - clear_to))
    with pytest.raises(ValueError, match="clear_to"):
        native.SlotCompactor(buffers, native=use_native, fills=fills)([0, 1, 2], 2)
    with pytest.raises(ValueError, match="fills"):
        native.SlotCompactor(buffers, native=use_native, fills=[0])


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slot_stepper_times_read_each_slots_stage_as_the_torch_gather(dtype: torch.dtype) -> None:
    """``SlotStepper.times`` in C++ equals ``time[i, max(step[i], 0)]`` (idle and parked slots: stage 0)."""
    g = torch.Generator().manual_seed(3)
    c, stages = 6, 5
    y = torch.zeros(c, 4, dtype=dtype)
    rows = torch.zeros(c, stages, 2 + 2 * 6, dtype=dtype)
    time = torch.rand(c, stages, generator=g, dtype=dtype)
    step = torch.tensor([0, 3, -1, 4, 2, -1], dtype=torch.int32)
    hist = torch.zeros(3, c, 4, dtype=dtype)
    counters = (step, torch.full((c,), stages), torch.zeros(c, dtype=torch.bool))
    stepper = native.SlotStepper(y, torch.zeros_like(y), hist, rows, time, *counters, True)
    for b in (1, 4, c):
        want = time[torch.arange(b), step[:b].clamp(min=0).long()]
        assert torch.equal(stepper.times(b), want)
    with pytest.raises(ValueError, match="b <="):
        stepper.times(c + 1)
    with pytest.raises(RuntimeError, match="C\\+\\+ call"):
        native.SlotStepper(y, torch.zeros_like(y), hist, rows, time, *counters, False).times(1)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slot_stepper_take_copies_rows_and_flags_the_non_finite(dtype: torch.dtype) -> None:
    """``SlotStepper.take`` in C++: copies of the slots' states, in the order asked, that later steps do not
    touch, and whether each is finite (a NaN or an inf anywhere in a row makes it not)."""
    c = 6
    y = torch.randn(c, 2, 3, generator=torch.Generator().manual_seed(5), dtype=dtype)
    y[1, 1, 2], y[4, 0, 0] = float("nan"), float("-inf")
    args = (torch.zeros_like(y), torch.zeros(3, c, 2, 3, dtype=dtype), torch.zeros(c, 5, 14, dtype=dtype),
            torch.zeros(c, 5, dtype=dtype), torch.zeros(c, dtype=torch.int32), torch.full((c,), 5),
            torch.zeros(c, dtype=torch.bool))
    stepper = native.SlotStepper(y, *args, True)
    slots = [4, 0, 1, 5]
    rows, finite = stepper.take(slots)
    torch.testing.assert_close(rows, y[slots], rtol=0, atol=0, equal_nan=True)
    assert finite == [False, True, False, True]
    kept = rows[1].clone()
    y[0] = 7.0  # the copies do not follow the pool
    assert torch.equal(rows[1], kept)
    with pytest.raises(ValueError, match="slots must lie"):
        stepper.take([0, c])


@needs_native
def test_slot_stepper_times_refuse_a_step_past_the_table() -> None:
    """A slot whose counter ran past its table is an error, not a silently clamped read."""
    c, stages = 3, 4
    y, time = torch.zeros(c, 2), torch.rand(c, stages)
    step = torch.tensor([0, stages, -1], dtype=torch.int32)
    stepper = native.SlotStepper(y, torch.zeros_like(y), torch.zeros(3, c, 2), torch.zeros(c, stages, 14),
                                 time, step, torch.full((c,), stages), torch.zeros(c, dtype=torch.bool), True)
    assert torch.equal(stepper.times(1), time[:1, 0])
    with pytest.raises(IndexError, match="past its table"):
        stepper.times(2)


@needs_native
@pytest.mark.parametrize("solver, opts", [("unipc", {}), ("ipndm", {}), ("dpmpp_2m", {})])
def test_bound_step_runs_every_stage_as_the_unbound_call(solver: str, opts: dict) -> None:
    """``BoundStep`` (the fused loop's step, validated once) advances a batch stage after stage exactly as
    ``ragged_step_native`` with the stage index expanded over the batch; it refuses a bad raw or stage."""
    packed, table = _case(solver, opts, bsz=3, dtype=torch.float32)
    start = _cpu_buffers(table, (2, 5), seed=4, dtype=torch.float32)
    got = {k: None if v is None else v.clone() for k, v in start.items()}
    want = {k: None if v is None else v.clone() for k, v in start.items()}
    stages = torch.arange(packed.stages, dtype=torch.int32)
    bound = native.BoundStep(got["y"], got["stash"], got["hist"], packed, stages)
    for k in range(packed.stages):
        raw = start["raw"] * (1 + 0.1 * k)
        bound(raw, k)
        native.ragged_step_native(want["y"], raw, want["stash"], want["hist"], packed, stages[k].expand(3))
        for name in ("y", "stash", "hist"):
            if want[name] is not None:
                assert torch.equal(got[name], want[name]), (name, k)
    with pytest.raises(ValueError, match="shaped and typed like the state"):
        bound(start["raw"].double(), 0)
    with pytest.raises(ValueError, match="stage"):
        bound(start["raw"], packed.stages)


@needs_native
def test_bound_step_keeps_the_graph_of_a_network_output_that_requires_grad() -> None:
    """A model whose output requires grad without the loop seeing a parameter (a closure over a tensor that
    requires grad) still gets its autograd graph through the fused loop's bound step, as on the torch
    backend: nothing is dropped silently."""
    w = torch.ones((), requires_grad=True)

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return w * x / (1 + sigma.view(-1, 1) ** 2)

    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)) * 80
    grid = torch.tensor([80.0, 10.0, 1.0, 0.0])
    plan = indis.prepare(model, x, grid, "dpmpp_2m")
    outs = {b: run_fused(plan, x, backend=b) for b in ("native", "torch")}
    for out in outs.values():
        assert out.requires_grad and out.grad_fn is not None
    torch.testing.assert_close(outs["native"], outs["torch"], rtol=1e-5, atol=1e-4)
