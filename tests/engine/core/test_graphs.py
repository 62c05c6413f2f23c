"""GraphSampler (whole-call CUDA graphs) and the no-host-sync guarantee of the sampling loop.

On CPU, GraphSampler runs its body eagerly (same code path as the captured one) and a TorchFunctionMode
fails the test on any host read of tensor values -- ``.item()``, ``.tolist()``, ``bool()``/``float()``/
``int()`` (Python branching on a tensor), ``nonzero`` -- inside the loop and inside the sync-free table build.
Where CUDA exists, ``torch.cuda.set_sync_debug_mode("error")`` checks the same on the device, and graphs
are really captured and replayed.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

import indis
from indis.engine.core.graphs import CaptureError, GraphSampler, ParameterWatch
from indis.engine.core.sampling import make_plan, prepare, run_fused, run_table
from indis.engine.core.solvers import build_table
from indis.engine.studies.convergence import small_mixture
from indis.engine.testbeds.tiny_diffusers import TEXT, text_unet
from tests.helpers import IDS, KERNEL_DEVICE, SOLVER_CASES
from tests.helpers import ragged_grids as _ragged_grids

CUDA = torch.cuda.is_available()
HOST_READS = {Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__float__, Tensor.__int__, Tensor.__index__,
              Tensor.nonzero, torch.nonzero}


class NoHostReads(TorchFunctionMode):
    """Raise on any operation that reads tensor values on the host (a sync on a GPU)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise AssertionError(f"host read of a tensor value inside the loop: {func.__name__}")
        return func(*args, **(kwargs or {}))


def _inputs(bsz: int = 4, steps: int = 5, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(bsz, 6, generator=g) * 80.0).to(device)
    grids = _ragged_grids(bsz, steps, seed=seed + 1).to(device)
    shift = (0.1 * torch.randn(bsz, steps, generator=g, dtype=torch.float64)).to(device)
    scale = (1 + 0.05 * torch.randn(bsz, steps, generator=g, dtype=torch.float64)).to(device)
    return x, indis.Schedule(grids, shift, scale)


def test_the_mode_catches_a_host_read() -> None:
    """Positive control: a denoiser that branches on a tensor value is caught."""
    model = small_mixture()
    x, sched = _inputs()
    plan = prepare(lambda x, s: model(x, s) if bool(s[0] > 1) else x, x, sched, "euler")
    with pytest.raises(AssertionError, match="__bool__"), NoHostReads():
        run_table(plan, x)


@pytest.mark.parametrize(("solver", "opts"), SOLVER_CASES, ids=IDS)
def test_loops_and_table_build_make_no_host_reads(solver: str, opts: dict) -> None:
    model = small_mixture().to(KERNEL_DEVICE)
    x, sched = _inputs(device=KERNEL_DEVICE)
    plan = prepare(model, x, sched, solver, **opts)
    with NoHostReads():
        run_table(plan, x)
        run_fused(plan, x, backend="torch")
        run_fused(plan, x, backend="triton")
        table = build_table(solver, sched.grid, plan.denoiser.family, shift=sched.shift, scale=sched.scale,
                            final_zero=False, infinite_start=False, check_finite=False, **opts)
        make_plan(plan.denoiser, table, x)
    torch.testing.assert_close(table.coef, plan.table.coef, rtol=0, atol=0)


def test_graph_sampler_matches_sample_and_replays_new_grids() -> None:
    """New x_T and new per-sample grids per call, one cache entry, results equal to indis.sample."""
    model = small_mixture()
    sampler = GraphSampler(model, "unipc", variant="bh2")
    for seed in range(3):
        x, sched = _inputs(seed=seed)
        out = sampler(x, sched)
        torch.testing.assert_close(out, indis.sample(model, x, sched, "unipc", variant="bh2"),
                                   rtol=1e-5, atol=1e-4)
    assert len(sampler._cache) == 1
    with NoHostReads():  # what a capture records -- table build and loop -- reads no tensor value
        sampler._body(next(iter(sampler._cache.values())))
    sampler(*_inputs(bsz=3))  # another batch size: another entry
    assert len(sampler._cache) == 2
    sampler.invalidate()
    assert not sampler._cache


def test_graph_sampler_runs_the_predictor_inside() -> None:
    model = small_mixture()
    cfg = indis.PredictorConfig(indis.ScheduleConfig(nfe=4, sigma_min=0.002, sigma_max=80.0), "ipndm", (6,))
    phi = indis.Predictor(cfg)
    torch.nn.init.normal_(phi.out.weight, std=0.05)  # an instance-dependent schedule
    sampler = GraphSampler(model, "ipndm", predictor=phi)
    x, _ = _inputs()
    torch.testing.assert_close(sampler(x), indis.sample(model, x, phi(x).detach(), "ipndm"),
                               rtol=1e-5, atol=1e-4)
    with NoHostReads(), torch.no_grad():  # schedule map, table build and loop: no host reads
        sampler._body(next(iter(sampler._cache.values())))
    with pytest.raises(ValueError, match="predictor"):
        sampler(x, _inputs()[1])


def test_graph_sampler_recaptures_when_a_parameter_is_replaced() -> None:
    model = small_mixture()
    sampler = GraphSampler(model, "euler")
    x, sched = _inputs()
    sampler(x, sched)
    first = next(iter(sampler._cache.values()))
    sampler(x, sched)
    assert next(iter(sampler._cache.values())) is first          # unchanged weights: same entry
    model.means = model.means.clone()                            # storage replaced
    sampler(x, sched)
    assert next(iter(sampler._cache.values())) is not first


def test_graph_sampler_rejects_bad_inputs() -> None:
    sampler = GraphSampler(small_mixture(), "euler")
    x, sched = _inputs()
    with pytest.raises(ValueError, match="sigmas"):
        sampler(x)
    with pytest.raises(ValueError, match="descending"):
        sampler(x, sched.grid.flip(-1))
    with pytest.raises(ValueError, match="cond"):
        sampler(x, sched, cond={"class_labels": torch.zeros(2)})
    for warmup in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="warmup"):
            GraphSampler(small_mixture(), "euler", warmup=warmup)


def test_graph_sampler_applies_the_checks_of_sample() -> None:
    """The same front door (``sampling.check_inputs``): NaN x_T, evaluation points and scales, solvers."""
    sampler = GraphSampler(small_mixture(), "euler")
    x, sched = _inputs()
    with pytest.raises(ValueError, match="x contains NaN"):
        sampler(x.clone().fill_(float("nan")), sched)
    steps = sched.grid.shape[-1] - 1
    with pytest.raises(ValueError, match="evaluated at sigma = inf"):
        sampler(x, indis.Schedule(sched.grid, torch.full((4, steps), 1000.0, dtype=torch.float64), None))
    with pytest.raises(ValueError, match="scale must be positive"):
        sampler(x, indis.Schedule(sched.grid, None, -torch.ones(4, steps, dtype=torch.float64)))
    with pytest.raises(ValueError, match="solver='dpm_fast' is unknown"):
        GraphSampler(small_mixture(), "dpm_fast")
    with pytest.raises(ValueError, match="unknown solver options"):
        GraphSampler(small_mixture(), "euler", frobnicate=1)
    with pytest.raises(ValueError, match="backend='cuda'"):
        GraphSampler(small_mixture(), "euler", backend="cuda")(x, sched)


def test_graph_sampler_checks_its_predictors_bounds_once_per_dtype() -> None:
    model = small_mixture()
    sc = indis.ScheduleConfig(nfe=4, sigma_min=0.002, sigma_max=80.0, shift_bound=12.0)
    phi = indis.Predictor(indis.PredictorConfig(sc, "ipndm", (6,)))
    sampler = GraphSampler(model, "ipndm", predictor=phi)
    x, _ = _inputs()
    assert torch.isfinite(sampler(x)).all()  # float32: 80 e^12 is fine
    with pytest.raises(ValueError, match="predictor's bounds .* do not fit torch.float16"):
        sampler(x.half())  # 80 e^12 = 1.3e7 overflows float16: refused before the graph runs
    assert sampler._bounds_checked == {torch.float32}
    tiny = indis.ScheduleConfig(nfe=3, sigma_min=1e-8, sigma_max=1.0, shift_bound=0.0, scale_bound=0.0)
    phi_tiny = indis.Predictor(indis.PredictorConfig(tiny, "euler", (6,)))
    euler = GraphSampler(model, "euler", predictor=phi_tiny)
    with pytest.raises(ValueError, match="sigma = 1e-08"):  # a predicted grid may evaluate next to sigma_min
        euler(x.half())


def test_graph_sampler_check_output_names_the_samples() -> None:
    def nan_for_sample_1(x: Tensor, sigma: Tensor) -> Tensor:
        out = small_mixture()(x, sigma)
        out[1] = float("nan")
        return out

    x, sched = _inputs()
    assert torch.isnan(GraphSampler(nan_for_sample_1, "euler")(x, sched)[1]).all()  # off by default
    with pytest.raises(FloatingPointError, match=r"sample\(s\) \[1\] of 4"):
        GraphSampler(nan_for_sample_1, "euler", check_output=True)(x, sched)


def _text_case(device: str = "cpu"):
    """A tiny diffusers text UNet with a per-sample grid, text embeddings, a shared negative prompt, and a
    predictor conditioned on the mean-pooled text embedding."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                  beta_end=0.012)
    den = indis.from_diffusers(text_unet().to(device), sched)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, generator=g).to(device) * den.family.s(torch.tensor(14.0)).item()
    pos, neg = torch.randn(3, 5, 12, generator=g).to(device), torch.zeros(1, 5, 12, device=device)
    grid = indis.grid_from_scheduler(sched, 4).to(device)
    sc = indis.ScheduleConfig(nfe=4, sigma_min=0.05, sigma_max=14.0, family="vp_linear")
    cfg = indis.PredictorConfig(sc, "dpmpp_2m", (4, 8, 8), cond_dim=12, pool=2)
    phi = indis.Predictor(cfg).to(device)
    torch.nn.init.normal_(phi.out.weight, std=0.05)
    return den, x, {TEXT: pos}, {TEXT: neg}, grid, phi


def test_graph_sampler_runs_guidance_with_text_conditions() -> None:
    """CFG with text embeddings through GraphSampler (eager on CPU, the captured body): equal to
    indis.sample; a new guidance scale (float or per sample) replays the same entry; the predictor reads
    a function of the condition (mean-pooled text) inside."""
    den, x, cond, uncond, grid, phi = _text_case()
    sampler = GraphSampler(den, "dpmpp_2m")
    with torch.no_grad():
        for scale in (7.5, torch.tensor([1.0, 4.0, 9.0])):
            ref = indis.sample(den, x, grid, "dpmpp_2m", cond=cond, uncond=uncond, guidance_scale=scale)
            out = sampler(x, grid, cond=cond, uncond=uncond, guidance_scale=scale)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert len(sampler._cache) == 1
        with NoHostReads():
            sampler._body(next(iter(sampler._cache.values())))
        pooled = GraphSampler(den, "dpmpp_2m", predictor=phi, predictor_cond=lambda c: c[TEXT].mean(1))
        sched = phi(x, cond[TEXT].mean(1))
        ref = indis.sample(den, x, sched, "dpmpp_2m", cond=cond, uncond=uncond, guidance_scale=5.0)
        torch.testing.assert_close(pooled(x, cond=cond, uncond=uncond, guidance_scale=5.0), ref, rtol=1e-5,
                                   atol=1e-5)
    for kw, match in [({"guidance_scale": 2.0}, "together"),
                      ({"uncond": {"other": uncond[TEXT]}, "guidance_scale": 2.0}, "same inputs"),
                      ({"uncond": uncond, "guidance_scale": torch.ones(2)}, "2 values for a batch of 3"),
                      ({"uncond": {TEXT: torch.zeros(2, 5, 12)}, "guidance_scale": 2.0}, "batch size 3")]:
        with pytest.raises(ValueError, match=match):
            sampler(x, grid, cond=cond, **kw)
    with pytest.raises(ValueError, match="does not pass"):
        GraphSampler(den, "dpmpp_2m", predictor=phi, predictor_cond="pooled")(x, cond=cond)


# ----------------------------------------------------------------------------------------------- CUDA
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (runs in benchmarks/gpu_suite.sh)")


@cuda_only
@pytest.mark.parametrize(("solver", "opts"), SOLVER_CASES, ids=IDS)
def test_cuda_loop_makes_no_sync(solver: str, opts: dict) -> None:
    model = small_mixture().cuda()
    x, sched = _inputs(device="cuda")
    plan = prepare(model, x, sched, solver, **opts)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused = run_fused(plan, x, backend="triton")
        eager = run_table(plan, x)
        table = build_table(solver, sched.grid, plan.denoiser.family, shift=sched.shift, scale=sched.scale,
                            final_zero=False, infinite_start=False, check_finite=False, **opts)
        make_plan(plan.denoiser, table, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-3)


@cuda_only
def test_cuda_graph_replays_new_grids_without_recapture() -> None:
    model = small_mixture().cuda()
    sampler = GraphSampler(model, "unipc")
    for seed in range(4):
        x, sched = _inputs(seed=seed, device="cuda")
        out = sampler(x, sched)
        torch.testing.assert_close(out, indis.sample(model, x, sched, "unipc"), rtol=1e-4, atol=1e-3)
    assert sampler.captured == 1 and sampler.graphs == 1
    model.means.mul_(1.5)                            # in place: the replay reads the new weights
    x, sched = _inputs(seed=9, device="cuda")
    torch.testing.assert_close(sampler(x, sched), indis.sample(model, x, sched, "unipc"), rtol=1e-4,
                               atol=1e-3)
    assert sampler.captured == 1
    model.means = model.means.clone()                # replaced storage: re-captured
    torch.testing.assert_close(sampler(x, sched), indis.sample(model, x, sched, "unipc"), rtol=1e-4,
                               atol=1e-3)
    assert sampler.captured == 2


@cuda_only
def test_cuda_graph_with_the_predictor_and_the_digits_unet() -> None:
    from indis.engine.testbeds.digits import load_backbone

    unet = load_backbone("unet").cuda()
    cfg = indis.PredictorConfig(indis.ScheduleConfig(nfe=5, sigma_min=0.002, sigma_max=80.0), "ipndm",
                                (1, 8, 8), pool=2)
    phi = indis.Predictor(cfg).cuda()
    torch.nn.init.normal_(phi.out.weight, std=0.05)
    sampler = GraphSampler(unet, "ipndm", predictor=phi)
    for seed in range(2):
        x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).cuda() * 80
        ref = indis.sample(unet, x, phi(x).detach(), "ipndm")
        torch.testing.assert_close(sampler(x), ref, rtol=1e-4, atol=1e-3)
    assert sampler.captured == 1


@cuda_only
def test_cuda_graph_captures_guidance_with_text_conditions() -> None:
    den, x, cond, uncond, grid, phi = _text_case("cuda")
    sampler = GraphSampler(den, "dpmpp_2m", predictor=phi, predictor_cond=lambda c: c[TEXT].mean(1))
    with torch.no_grad():
        for scale in (7.5, torch.tensor([1.0, 4.0, 9.0], device="cuda")):
            sched = phi(x, cond[TEXT].mean(1))
            ref = indis.sample(den, x, sched, "dpmpp_2m", cond=cond, uncond=uncond, guidance_scale=scale)
            out = sampler(x, cond=cond, uncond=uncond, guidance_scale=scale)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert sampler.captured == 1 and sampler.graphs == 1


@cuda_only
def test_cuda_graph_capture_failure_is_remembered_and_restores_the_stream() -> None:
    """A denoiser that reads a value back (a host sync) cannot be captured: the call raises CaptureError (a
    failed capture is never kept and replaced by an eager run), the caller's stream is current afterwards,
    and the next call with that key raises at once, without running the model again, until invalidate()."""
    model = small_mixture().cuda()
    calls = {"n": 0}

    def syncing(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return model(x, sigma) * (sigma.max().item() > -1)

    sampler = GraphSampler(syncing, "dpmpp_2m")
    x, sched = _inputs(device="cuda")
    stream = torch.cuda.current_stream()
    with pytest.raises(CaptureError, match="cannot be captured"):
        sampler(x, sched)
    assert torch.cuda.current_stream() == stream and calls["n"] > 0
    n = calls["n"]
    with pytest.raises(CaptureError, match="cannot be captured"):
        sampler(x, sched)
    assert calls["n"] == n and torch.cuda.current_stream() == stream
    assert sampler.graphs == 0 and sampler.captured == 0 and len(sampler.failed) == 1
    sampler.invalidate()
    assert not sampler.failed


def test_parameter_watch_sees_every_way_a_storage_or_the_tree_changes() -> None:
    """``ParameterWatch.signature`` stays the same while the parameters stay where they are (also after
    in-place updates) and changes with each way a storage can move or the module tree change: a replaced
    parameter or buffer, ``.data`` assigned, a dtype conversion, a child appended, inserted, deleted, written
    into ``_modules`` directly or removed and replaced in its slot, a module's dicts replaced, the network of
    a Denoiser replaced; a function has nothing to watch."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    den = indis.Denoiser(net)
    watch = ParameterWatch()
    last = [watch.signature(den, None)]

    def moved() -> bool:
        now = watch.signature(den, None)
        changed, last[0] = now != last[0], now
        return changed

    assert not moved() and not moved()
    with torch.no_grad():
        net[0].weight.mul_(2)
    net.load_state_dict(net.state_dict())
    assert not moved()
    changes = [lambda: setattr(net[0], "weight", torch.nn.Parameter(net[0].weight.detach().clone())),
               lambda: setattr(net[1], "running_mean", net[1].running_mean.clone()),
               lambda: setattr(net[0].bias, "data", net[0].bias.detach().clone()),
               lambda: net.double(),
               lambda: net.append(torch.nn.Linear(3, 3)),
               lambda: net.insert(0, torch.nn.Identity()),
               lambda: net.__delitem__(0),
               lambda: net._modules.__setitem__("2", torch.nn.Linear(3, 3)),
               lambda: setattr(net, "_modules", {"0": torch.nn.Linear(3, 3)}),
               lambda: setattr(net[0], "_parameters", {"weight": torch.nn.Parameter(torch.ones(3, 3))}),
               lambda: setattr(net, "extra", torch.nn.Linear(3, 3)),
               lambda: setattr(net, "extra", None),            # a child removed, then a new one in its slot
               lambda: setattr(net, "extra", torch.nn.Linear(3, 3)),
               lambda: setattr(den, "net", torch.nn.Linear(3, 3))]
    for i, change in enumerate(changes):
        change()
        assert moved() and not moved(), i
    assert watch.signature(den) != watch.signature(den, torch.nn.Linear(2, 2))
    plain = ParameterWatch()
    assert plain.signature(lambda x: x) == plain.signature(lambda x: x)


@cuda_only
def test_cuda_graph_captures_a_model_that_registers_a_buffer_on_its_first_call() -> None:
    """A model that registers a buffer lazily (a cache made on the first forward, as rotary embeddings do) is
    captured on the first call: the graph's reference signature is taken after the warm-up."""
    mixture = small_mixture().cuda()

    class Lazy(torch.nn.Module):
        def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            if not hasattr(self, "cache"):
                self.register_buffer("cache", torch.ones(1, device=x.device))
            return mixture(x, sigma) * self.cache

    model = Lazy()
    sampler = GraphSampler(model, "dpmpp_2m")
    x, sched = _inputs(device="cuda")
    out = sampler(x, sched)
    assert sampler.captured == 1 and not sampler.failed
    torch.testing.assert_close(sampler(x, sched), out)
    assert sampler.captured == 1
