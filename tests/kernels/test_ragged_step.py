"""The fused ragged step (Triton, interpreted on CPU) against its torch reference and the float64 loop.

Tolerance rule (flash-attention's): the kernel's error against float64 must stay within twice the error of
torch computing the same thing in the low-precision dtype, plus a small absolute slack. bf16 is stored only:
the kernel upcasts after every load (the interpreter miscomputes bf16 arithmetic).
"""

from __future__ import annotations

import pytest
import torch

import indis
from indis.engine.core.families import Denoiser, Flow, VPLinear
from indis.engine.core.sampling import prepare, run, run_fused, run_table
from indis.engine.studies.convergence import small_mixture
from indis.kernels import native
from indis.kernels.ragged_step import (
    PackedTable,
    TritonBoundStep,
    backend_for,
    pack_table,
    ragged_step,
    ragged_step_torch,
    ragged_step_triton,
)
from tests.helpers import IDS, SOLVER_CASES, kernel_buffers, kernel_table, loop_case
from tests.helpers import KERNEL_DEVICE as DEV
from tests.helpers import flow_velocity as _flow_velocity

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # relative to max |reference|
# The Triton interpreter casts float32 -> bfloat16 by truncation (measured: twice round-to-nearest's mean
# error, all toward zero), which a whole sampling run accumulates; compiled kernels round to nearest.
LOOP_SLACK = {torch.bfloat16: 4 if DEV.type == "cpu" else 2}


_table, _buffers = kernel_table, kernel_buffers  # the names test_native imports from here


def _apply(fn, table, time, buffers: dict, step: torch.Tensor, dtype: torch.dtype, **kw) -> dict:
    out = {k: None if v is None else v.to(dtype).clone() for k, v in buffers.items()}
    fn(out["y"], out["raw"], out["stash"], out["hist"], pack_table(table, time, dtype), step, **kw)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("solver", "opts"), SOLVER_CASES, ids=IDS)
def test_kernel_matches_reference_on_a_ragged_batch(solver: str, opts: dict, dtype: torch.dtype) -> None:
    """Random stages per sample, finished/idle samples (-1, S, S+2), odd sample sizes with a tail mask."""
    bsz = 7
    table, time = _table(solver, opts, bsz)
    stages = table.coef.shape[1]
    g = torch.Generator().manual_seed(3)
    step = torch.randint(0, stages, (bsz,), generator=g)
    step[[1, 4, 6]] = torch.tensor([-1, stages, stages + 2])
    step = step.to(DEV)
    for shape in [(37,), (3, 5, 7)]:
        buffers = _buffers(table, shape, seed=5)
        ref = _apply(ragged_step_torch, table, time, buffers, step, torch.float64)
        lowp = _apply(ragged_step_torch, table, time, buffers, step, dtype, compute=dtype)
        kern = _apply(ragged_step_triton, table, time, buffers, step, dtype, block=64)  # several blocks
        for name in ("y", "stash", "hist"):
            if ref[name] is None:
                continue
            scale = ref[name].abs().max()
            err_k = (kern[name].double() - ref[name]).abs().max()
            err_t = (lowp[name].double() - ref[name]).abs().max()
            assert err_k <= 2 * err_t + ATOL[dtype] * scale, f"{name}: {err_k:.3g} vs torch {err_t:.3g}"
        done = torch.tensor([False, True, False, False, True, False, True], device=DEV)
        for name in ("y", "stash"):  # finished / idle samples are not written at all
            if kern[name] is not None:
                assert torch.equal(kern[name][done], buffers[name][done].to(dtype))
        if kern["hist"] is not None:
            assert torch.equal(kern["hist"][:, done], buffers["hist"][:, done].to(dtype))


@pytest.mark.parametrize(("solver", "opts"), SOLVER_CASES, ids=IDS)
def test_first_stage_reads_no_unwritten_slot(solver: str, opts: dict) -> None:
    """At stage 0 history (and any stash not yet written) is NaN-poisoned: nothing it holds may leak."""
    table, time = _table(solver, opts, bsz=3)
    buffers = _buffers(table, (33,), seed=1)
    for name in ("stash", "hist"):
        if buffers[name] is not None:
            buffers[name] = torch.full_like(buffers[name], float("nan"))
    step = torch.zeros(3, dtype=torch.int32, device=DEV)
    for fn in (ragged_step_triton, ragged_step_torch):
        out = _apply(fn, table, time, buffers, step, torch.float32)
        assert torch.isfinite(out["y"]).all(), fn.__name__


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("solver", "opts"), SOLVER_CASES, ids=IDS)
def test_fused_loop_matches_the_reference_loop(solver: str, opts: dict, dtype: torch.dtype) -> None:
    """Whole sampling runs: fused loop (kernel) vs run_table in float64 and in the low-precision dtype."""
    x64, plan = loop_case(solver, opts)
    x = x64.to(dtype)
    ref = run_table(plan(x64), x64)
    torch_lowp = run_table(plan(x), x)
    fused = run_fused(plan(x), x, backend="triton")
    err_k, err_t = (fused.double() - ref).abs().max(), (torch_lowp.double() - ref).abs().max()
    slack = LOOP_SLACK.get(dtype, 2)
    assert err_k <= slack * err_t + ATOL[dtype] * ref.abs().max(), f"kernel {err_k:.3g} vs torch {err_t:.3g}"
    fused_ref = run_fused(plan(x64), x64, backend="torch")  # the kernel's reference, ring buffer and all
    torch.testing.assert_close(fused_ref, ref, rtol=1e-12, atol=1e-12)


def test_fused_loop_serves_vp_and_flow_models_with_shift() -> None:
    """Prediction conversion (eps, velocity) and the shifted network input go through the fused loop too."""
    gmm = small_mixture().to(DEV)
    vp = VPLinear()

    def eps_net(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = vp.sigma(t.double()).view(-1, 1)
        x_ve = x_vp.double() * torch.sqrt(1 + sigma**2)
        return ((x_ve - gmm(x_ve, sigma.flatten())) / sigma).to(x_vp.dtype)

    flow = Flow()
    cases = [(Denoiser(eps_net, vp, "eps", "t"), indis.get_sigmas("logsnr", 6, 0.01, 50.0, device=DEV),
              "dpmpp_2m"),
             (Denoiser(_flow_velocity(gmm), flow, "velocity", "t"),
              indis.as_grid(timesteps=torch.linspace(0.98, 0.02, 7, dtype=torch.float64, device=DEV),
                            family=flow)[0], "unipc")]
    g = torch.Generator().manual_seed(6)
    for den, grid, solver in cases:
        x64 = torch.randn(3, 6, generator=g, dtype=torch.float64).to(DEV)
        shift = (0.1 * torch.randn(3, 6, generator=g, dtype=torch.float64)).to(DEV)
        ref = run_table(prepare(den, x64, grid, solver, shift=shift), x64)
        x = x64.float()
        fused = run_fused(prepare(den, x, grid, solver, shift=shift), x, backend="triton")
        torch.testing.assert_close(fused.double(), ref, rtol=1e-4, atol=1e-4)


def test_in_place_and_out_of_range_inputs_are_rejected() -> None:
    table, time = _table("ipndm", {}, bsz=2)
    buffers = _buffers(table, (8,), seed=0)
    zeros = torch.zeros(2, dtype=torch.int32, device=DEV)
    out = _apply(ragged_step_torch, table, time, buffers, zeros, torch.float32)
    packed = pack_table(table, time, torch.float32)
    y = out["y"]
    with pytest.raises(ValueError, match="raw"):
        ragged_step(y, y[:, :4], None, out["hist"], packed, zeros)
    with pytest.raises(ValueError, match="history"):
        ragged_step(y, y.clone(), None, None, packed, zeros)
    with pytest.raises(ValueError, match="step"):
        ragged_step(y, y.clone(), None, out["hist"], packed, torch.zeros(3, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="contiguous"):
        hist_t = out["hist"].transpose(1, 2).contiguous().transpose(1, 2)
        ragged_step_triton(y, y.clone(), None, hist_t, packed, zeros)


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv("INDIS_KERNELS", raising=False)
    assert backend_for(cpu) == ("native" if native.available() else "torch")
    assert backend_for(torch.device("cuda")) == "triton"
    monkeypatch.setenv("INDIS_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_for(cpu) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend_for(cpu)
    monkeypatch.setenv("INDIS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="INDIS_KERNELS"):
        backend_for(cpu)
    monkeypatch.setenv("INDIS_KERNELS", "native")
    monkeypatch.setattr(native, "available", lambda: False)
    with pytest.raises(RuntimeError, match="INDIS_KERNELS=native"):
        backend_for(cpu)
    monkeypatch.delenv("INDIS_KERNELS")
    assert backend_for(cpu) == "torch"  # no extension: the pure-Python path


def test_sample_dispatches_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """INDIS_KERNELS=triton routes indis.sample through the fused loop (same result to fp32 rounding)."""
    model = small_mixture().to(DEV)
    x = (torch.randn(3, 6, generator=torch.Generator().manual_seed(0)) * 80.0).to(DEV)
    grid = indis.get_sigmas("edm", 5, 0.002, 80.0, device=DEV)
    calls = []
    monkeypatch.setattr("indis.engine.core.sampling.run_fused",
                        lambda *a, **k: calls.append(1) or run_fused(*a, **k))
    monkeypatch.setenv("INDIS_KERNELS", "torch")
    eager = indis.sample(model, x, grid, "unipc")
    assert not calls
    monkeypatch.setenv("INDIS_KERNELS", "triton")
    fused = indis.sample(model, x, grid, "unipc")
    assert calls
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-4)
    assert run(prepare(model, x.double(), grid, "unipc"), x.double()).dtype == torch.float64  # torch loop


@pytest.mark.parametrize(("solver", "opts"), [SOLVER_CASES[2], SOLVER_CASES[7]], ids=[IDS[2], IDS[7]])
def test_kernel_on_the_leading_slots_of_a_pool(solver: str, opts: dict) -> None:
    """The continuous batcher steps pool[:b] (history pool[:, :b], not contiguous as a whole)."""
    table, time = _table(solver, opts, bsz=6)
    pool = _buffers(table, (20,), seed=2)
    step = torch.tensor([0, 2, 1, -1], dtype=torch.int32, device=DEV)
    packed = pack_table(table, time, torch.float32)
    rows4 = type(packed)(packed.rows[:4], packed.time[:4], None, packed.history, packed.uses_stash)
    outs = []
    for fn in (ragged_step_triton, ragged_step_torch):
        buf = {k: v.float().clone() for k, v in pool.items() if v is not None}
        hist = buf["hist"][:, :4]
        assert not hist.is_contiguous()
        stash = buf["stash"][:4] if "stash" in buf else None
        fn(buf["y"][:4], buf["raw"][:4], stash, hist, rows4, step)
        outs.append(buf)
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[0][k][..., 4:, :] if k == "hist" else outs[0][k][4:],
                                   pool[k].float()[..., 4:, :] if k == "hist" else pool[k].float()[4:])


@pytest.mark.parametrize(("solver", "opts"), [("unipc", {}), ("ipndm", {}), ("dpmpp_2m", {})])
def test_bound_step_runs_every_stage_as_the_unbound_call(solver: str, opts: dict) -> None:
    """``TritonBoundStep`` (the fused loop's step, validated once) advances a batch stage after stage exactly
    as ``ragged_step_triton`` with the stage index expanded over the batch; it refuses a bad raw or stage."""
    table, time = _table(solver, opts, bsz=3)
    packed = pack_table(table, time, torch.float32)
    start = {k: None if v is None else v.float() for k, v in _buffers(table, (2, 5), seed=4).items()}
    got = {k: None if v is None else v.clone() for k, v in start.items()}
    want = {k: None if v is None else v.clone() for k, v in start.items()}
    stages = torch.arange(packed.stages, dtype=torch.int32, device=DEV)
    bound = TritonBoundStep(got["y"], got["stash"], got["hist"], packed, stages)
    for k in range(packed.stages):
        raw = start["raw"] * (1 + 0.1 * k)
        bound(raw, k)
        ragged_step_triton(want["y"], raw, want["stash"], want["hist"], packed, stages[k].expand(3))
        for name in ("y", "stash", "hist"):
            if want[name] is not None:
                assert torch.equal(got[name], want[name]), (name, k)
    with pytest.raises(ValueError, match="shaped and typed like the state"):
        bound(start["raw"].half(), 0)
    with pytest.raises(ValueError, match="contiguous"):
        bound(start["raw"].transpose(1, 2).contiguous().transpose(1, 2), 0)
    with pytest.raises(ValueError, match="stage"):
        bound(start["raw"], packed.stages)
    with pytest.raises(ValueError, match="history must be"):
        TritonBoundStep(got["y"], got["stash"], None, packed, stages)  # each of these solvers keeps history


def test_fused_triton_loop_steps_through_the_bound_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_fused on the triton backend calls the bound step once per stage, and keeps the autograd graph
    of a network output that requires grad (a closure over a tensor that does), as the torch backend does."""
    calls = []
    bound_call = TritonBoundStep.__call__

    def step(self, raw, k) -> None:
        calls.append(k)
        bound_call(self, raw, k)

    monkeypatch.setattr(TritonBoundStep, "__call__", step)
    w = torch.ones((), device=DEV, requires_grad=True)

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return w * x / (1 + sigma.view(-1, 1) ** 2)

    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)).to(DEV) * 80
    plan = indis.prepare(model, x, torch.tensor([80.0, 10.0, 1.0, 0.0], device=DEV), "dpmpp_2m")
    with torch.no_grad():
        plain = run_fused(plan, x, backend="triton")
    assert calls == list(range(plan.packed.stages))
    outs = {b: run_fused(plan, x, backend=b) for b in ("triton", "torch")}
    for out in outs.values():
        assert out.requires_grad and out.grad_fn is not None
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(plain, outs["torch"].detach(), rtol=1e-5, atol=1e-4)


def test_gradients_flow_through_the_reference_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused step is in place and outside autograd: when a gradient is needed, sample runs run_table."""
    monkeypatch.setenv("INDIS_KERNELS", "triton")
    model = small_mixture().to(DEV)
    logits = torch.zeros(2, 6, dtype=torch.float64, device=DEV, requires_grad=True)
    grid = indis.grid_from_logits(logits, 0.002, 80.0)
    x = torch.randn(2, 6, dtype=torch.float32, device=DEV) * 80  # float32: the fused path would apply
    out = indis.sample(model, x, grid, "ipndm")
    out.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


OP_BACKENDS = ["torch"] + (["native"] if native.available() else [])
# neither a stash nor history / history only / both
OP_CASES = [("euler", {}), ("dpmpp_3m", {}), ("unipc", {"variant": "bh2", "order": 3})]
OP_IDS = ["euler", "dpmpp_3m", "unipc-bh2-3"]


def _op_args(solver: str, opts: dict, dtype: torch.dtype, backend: str, bsz: int = 4, shape=(1, 3, 3),
             seed: int = 0) -> tuple:
    """Arguments of ``torch.ops.indis.ragged_step`` for a ragged batch (the last sample idle: step -1)."""
    table, time = _table(solver, opts, bsz, seed=seed)
    dev = torch.device("cpu") if backend == "native" else DEV
    buf = {k: None if v is None else v.to(dev, dtype) for k, v in _buffers(table, shape, seed).items()}
    packed = pack_table(table, time, dtype)
    step = torch.randint(0, packed.stages, (bsz,), generator=torch.Generator().manual_seed(seed))
    step[-1] = -1
    return (buf["y"], buf["raw"], buf["stash"], buf["hist"], packed.rows.to(dev), step.to(dev),
            packed.history, packed.uses_stash, backend)


def _packed(rows: torch.Tensor, history: int, uses_stash: bool) -> PackedTable:
    return PackedTable(rows, rows[..., 0], None, history, uses_stash)


def test_custom_op_declares_what_it_writes() -> None:
    schema = torch.ops.indis.ragged_step.default._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"y", "stash", "hist"}
    assert not schema.returns


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize(("solver", "opts"), OP_CASES, ids=OP_IDS)
def test_custom_op_opcheck(solver: str, opts: dict, backend: str) -> None:
    """Schema (declared mutations), fake tensor and AOT-dispatch checks, then the autograd registration check
    with a gradient-needing input (``raw``: the written buffers cannot be leaves that require grad)."""
    op = torch.ops.indis.ragged_step.default
    args = _op_args(solver, opts, torch.float32, backend)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, args, test_utils=checks)
    torch.library.opcheck(op, (args[0], args[1].clone().requires_grad_(), *args[2:]))


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize(("solver", "opts"), OP_CASES, ids=OP_IDS)
def test_custom_op_matches_the_direct_call_bit_for_bit(solver: str, opts: dict, backend: str) -> None:
    args = _op_args(solver, opts, torch.float32, backend)
    y, raw, stash, hist, rows, step, history, uses_stash, _ = args
    direct = [None if t is None else t.clone() for t in (y, stash, hist)]
    ragged_step(direct[0], raw, direct[1], direct[2], _packed(rows, history, uses_stash), step, backend)
    torch.ops.indis.ragged_step(*args)
    assert not torch.equal(y, args[1])  # the step wrote something
    for a, b in zip((y, stash, hist), direct, strict=True):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_compiled_loop_has_no_graph_break_and_equals_eager(backend: str) -> None:
    """``torch.compile(fullgraph=True)`` of a small sampling loop (a linear toy denoiser, every stage) traces
    the step as the custom op, functionalized, and gives the eager result bit for bit."""
    y0, _, stash0, hist0, rows, _, history, uses_stash, _ = _op_args(
        "unipc", {"variant": "bh2", "order": 3}, torch.float32, backend)
    packed = _packed(rows, history, uses_stash)
    stage = torch.arange(packed.stages, dtype=torch.int32, device=y0.device)

    def loop(y: torch.Tensor, stash: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        for k in range(packed.stages):
            ragged_step(y, 0.5 * y + 0.25, stash, hist, packed, stage[k].expand(y.shape[0]), backend)
        return y

    graphs = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    eager, compiled = [t.clone() for t in (y0, stash0, hist0)], [t.clone() for t in (y0, stash0, hist0)]
    loop(*eager)
    torch.compile(loop, backend=capture, fullgraph=True)(*compiled)
    assert len(graphs) == 1
    op = torch.ops.indis.ragged_step
    assert sum(n.target in (op, op.default) for n in graphs[0].graph.nodes) == packed.stages
    for a, b, before in zip(compiled, eager, (y0, stash0, hist0), strict=True):  # written back in place
        assert torch.equal(a, b) and not torch.equal(a, before)


def _grad_case(backend: str) -> tuple:
    args = _op_args("unipc", {"variant": "bh2", "order": 3}, torch.float64, backend, bsz=3, shape=(2,))
    y, raw, stash, hist, rows, step = (t.requires_grad_() if t.is_floating_point() else t for t in args[:6])
    return (y, raw, stash, hist, rows), step, args[6:]


def test_custom_op_backward_passes_gradcheck() -> None:
    """The step is linear in y, raw, stash, hist and in each nonzero coefficient: float64 gradcheck through
    the op (and through ``ragged_step``) w.r.t. all of them. Exact zero coefficients are structural (never
    read, and an all-zero stash row keeps the stash), so the check perturbs only the nonzero ones."""
    (y, raw, stash, hist, rows), step, (history, uses_stash, backend) = _grad_case("torch")
    nonzero = rows.detach() != 0
    assert not nonzero.all()

    def step_fn(y, raw, stash, hist, rows, via_op: bool = True):
        y, stash, hist = y.clone(), stash.clone(), hist.clone()
        rows = torch.where(nonzero, rows, 0.0)
        if via_op:
            torch.ops.indis.ragged_step(y, raw, stash, hist, rows, step, history, uses_stash, backend)
        else:
            ragged_step(y, raw, stash, hist, _packed(rows, history, uses_stash), step, backend)
        return y, stash, hist

    assert torch.autograd.gradcheck(step_fn, (y, raw, stash, hist, rows))
    assert torch.autograd.gradcheck(lambda *a: step_fn(*a, via_op=False), (y, raw, stash, hist, rows))
    out = step_fn(y, raw, stash, hist, rows)
    grads = torch.autograd.grad(sum(o.sum() for o in out), (y, raw))
    assert all(g.abs().sum() > 0 for g in grads)  # not vacuous: gradients reach the state and the output


@pytest.mark.skipif(not native.available(), reason=native.REASON)
def test_native_backend_differentiates_like_the_reference() -> None:
    """A gradient-needing call on the C++ backend (op or ``ragged_step``) records the reference's graph:
    the same values and gradients as the torch backend, not a write autograd cannot see."""
    results = []
    for backend, via_op in (("torch", True), ("native", True), ("native", False)):
        (y, raw, stash, hist, rows), step, (history, uses_stash, _) = _grad_case(backend)
        out = [t.detach().clone() for t in (y, stash, hist)]
        if via_op:
            torch.ops.indis.ragged_step(out[0], raw, out[1], out[2], rows, step, history, uses_stash, backend)
        else:
            ragged_step(out[0], raw, out[1], out[2], _packed(rows, history, uses_stash), step, backend)
        assert out[0].grad_fn is not None
        results.append((out, torch.autograd.grad(sum(o.sum() for o in out), (raw, rows))))
    for out, grads in results[1:]:
        for a, b in zip(out + list(grads), results[0][0] + list(results[0][1]), strict=True):
            assert torch.equal(a, b)
