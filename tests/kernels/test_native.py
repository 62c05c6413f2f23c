"""The optional C++ step (indis_native) against its torch reference, and whole sampling loops through it.

CPU only. Skipped (with the loader's reason) where the extension is not built: ``.ci/build_native.sh``.
float32 results are expected to equal the reference's (same summation order, no fused multiply-adds); the
comparisons allow float32 rounding all the same.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from indis.engine.convergence import small_mixture
from indis.engine.sampling import prepare, run_fused, run_table
from indis.engine.solvers import SolverTable
from indis.kernels import native
from indis.kernels.ragged_step import PackedTable, pack_table, ragged_step_torch
from tests.engine.test_sampling import _ragged_grids
from tests.kernels.test_ragged_step import IDS, SOLVER_CASES, _buffers, _table

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
    """run_fused with its step swapped for the native one equals run_table (float32: within its rounding)."""
    model = small_mixture()
    bsz, steps = 5, 6
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(bsz, 6, generator=g, dtype=torch.float64) * 80.0
    grids = _ragged_grids(bsz, steps, seed=2)
    shift = 0.1 * torch.randn(bsz, steps, generator=g, dtype=torch.float64)
    scale = 1 + 0.05 * torch.randn(bsz, steps, generator=g, dtype=torch.float64)

    def plan(x: torch.Tensor):
        return prepare(model, x, grids, solver, shift=shift, scale=scale, **opts)

    calls = []

    def step(y, raw, stash, hist, packed, stage, backend=None) -> None:
        calls.append(stage)
        native.ragged_step_native(y, raw, stash, hist, packed, stage)

    monkeypatch.setattr("indis.engine.sampling.ragged_step", step)
    x = x64.to(dtype)
    fused = run_fused(plan(x), x)
    assert len(calls) == plan(x).packed.stages
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
