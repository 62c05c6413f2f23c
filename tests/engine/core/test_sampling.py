"""``indis.sample``'s input checks: grids, options, states, evaluation points and scales, backends and
``check_output``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import indis
from indis.engine.core.families import Denoiser, Flow, VPLinear
from tests.helpers import ok_args as _ok_args


def test_grid_outside_family_range_raises() -> None:
    fam = VPLinear()
    den = Denoiser(lambda x, t: x, fam, "eps", "t")
    with pytest.raises(ValueError, match="outside the family's range"):
        indis.sample(den, torch.zeros(1, 2), torch.tensor([1e4, 1.0]), "euler")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"solver": "dpm_fast"}, "solver='dpm_fast' is unknown"),
    ({"solver": "euler", "shift": torch.zeros(3)}, "shift must have shape"),
    ({"solver": "euler", "scale": -torch.ones(2)}, "scale must be positive"),
    ({"solver": "euler", "shift": torch.tensor([0.0, float("nan")])}, "shift contains NaN"),
    ({"solver": "euler", "frobnicate": 1}, "unknown solver options"),
])
def test_bad_options_raise(kwargs, match) -> None:
    model, x, sig = _ok_args()
    solver = kwargs.pop("solver")
    with pytest.raises(ValueError, match=match):
        indis.sample(model, x, sig[:3] if solver != "unipc" else sig, solver, **kwargs)


def test_bad_x_raises() -> None:
    model, x, sig = _ok_args()
    with pytest.raises(ValueError, match="x contains NaN"):
        indis.sample(model, torch.full((2, 3), float("nan")), sig, "euler")
    with pytest.raises(ValueError, match="x must be a floating-point"):
        indis.sample(model, torch.zeros(2, 3, dtype=torch.long), sig, "euler")
    with pytest.raises(ValueError, match="batch has 2 samples"):
        indis.sample(model, x, sig.repeat(3, 1), "euler")
    with pytest.raises(ValueError, match="sigmas is on meta but x is on cpu"):
        indis.sample(model, x, sig.to("meta"), "euler")


@pytest.mark.parametrize(("dtype", "kwargs", "match"), [
    (torch.float64, {"shift": [1000.0, 0.0]}, "sample 0, step 0: the network would be evaluated at sigma = "
                                              "inf"),
    (torch.float32, {"shift": [0.0, -110.0]}, "step 1: .*rounds to 0\\) in torch.float32"),
    (torch.float32, {"scale": [1e40, 1.0]}, "scale is too large for torch.float32"),
    (torch.float32, {"scale": [1e30, 1e30]}, "scale is too large for torch.float32"),
    (torch.float64, {"scale": [1.0, -0.5]}, "scale must be positive"),
    (torch.float64, {"scale": [1.0, 0.0]}, "scale must be positive"),
])
def test_evaluation_points_and_scales_must_be_finite_in_the_state_dtype(dtype, kwargs, match) -> None:
    model, x, sig = _ok_args()
    kwargs = {k: torch.tensor(v, dtype=torch.float64) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        indis.sample(model, x.to(dtype), sig, "euler", **kwargs)


def test_only_points_the_solver_evaluates_and_only_the_network_time_count() -> None:

    model = lambda x, s: x  # noqa: E731
    x = torch.zeros(2, 3, dtype=torch.float16)
    tiny_end = torch.tensor([10.0, 1.0, 1e-9], dtype=torch.float64)  # 1e-9 rounds to 0 in float16
    assert torch.isfinite(indis.sample(model, x, tiny_end, "euler", backend="torch")).all()  # never evaluated
    with pytest.raises(ValueError, match="step 1: .* rounds to 0"):
        indis.sample(model, x, tiny_end, "heun", backend="torch")  # Heun's corrector evaluates sigma_min
    flow = Denoiser(lambda x, t: torch.zeros_like(x), Flow(), "velocity", "t", time_scale=1000.0)
    near_one = torch.tensor([float("inf"), 1e5, 1.0, 0.0], dtype=torch.float64)  # t = 0.99999: time 999.99
    assert torch.isfinite(indis.sample(flow, x, near_one, "euler", backend="torch")).all()


def test_family_aware_limits_in_float16() -> None:
    """The scale bound uses the state's noise scale (a flow state stays near 1 however large sigma is); a
    t-input network may see t near 0; coefficients must fit the state dtype."""
    from indis.engine.core.families import VPCosine

    x = torch.zeros(2, 3, dtype=torch.float16)
    flow = Denoiser(lambda x, t: torch.zeros_like(x), Flow(), "velocity", "t", time_scale=1000.0)
    near_one = torch.tensor([1e5, 1.0, 0.5, 0.0], dtype=torch.float64)
    out = indis.sample(flow, x, near_one, "euler", scale=torch.ones(3, dtype=torch.float64), backend="torch")
    assert torch.isfinite(out).all()
    vp = Denoiser(lambda x, t: torch.zeros_like(x), VPCosine(), "eps", "t")
    grid = indis.get_sigmas("logsnr", 4, 2e-5, 10.0, family=VPCosine())
    assert torch.isfinite(indis.sample(vp, x, grid, "heun", backend="torch")).all()  # time 1e-8 is fine
    with pytest.raises(ValueError, match="heun: a coefficient of this grid .* overflows torch.float16"):
        indis.sample(lambda x, s: x, x, torch.tensor([10.0, 1.0, 1e-5], dtype=torch.float64), "heun")


def test_the_same_shift_and_scale_pass_in_float64() -> None:
    model, x, sig = _ok_args()
    shift = torch.tensor([0.0, -110.0], dtype=torch.float64)
    out = indis.sample(model, x.double(), sig, "euler", shift=shift)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_check_output_names_the_samples_and_the_stage_of_a_nan(backend: str) -> None:
    from indis.kernels import native

    if backend == "native" and not native.available():
        pytest.skip(native.REASON)
    calls = []

    def model(x, sigma):  # sample 2 goes NaN at the third call
        calls.append(1)
        out = x / (1 + sigma.view(-1, 1) ** 2)
        if len(calls) == 3:
            out = out.clone()
            out[2] = float("nan")
        return out

    x = torch.randn(4, 3, dtype=torch.float64) * 80
    sig = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.002], dtype=torch.float64)
    out = indis.sample(model, x, sig, "ipndm", backend=backend)  # off by default: the NaN passes through
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3]]).all()
    calls.clear()
    with pytest.raises(FloatingPointError, match=r"model output is NaN or inf at stage 2 \(step 2\) for "
                                                 r"sample\(s\) \[2\] of 4"):
        indis.sample(model, x, sig, "ipndm", backend=backend, check_output=True)
    calls.clear()
    clean = indis.sample(lambda x, s: x / (1 + s.view(-1, 1) ** 2), x, sig, "ipndm", backend=backend,
                         check_output=True)
    assert torch.isfinite(clean).all()


def test_backend_names_and_availability_are_checked() -> None:
    model, x, sig = _ok_args()
    with pytest.raises(ValueError, match="backend='cuda': choose one of"):
        indis.sample(model, x, sig, "euler", backend="cuda")
    from indis.kernels.ragged_step import backend_for

    with pytest.raises(RuntimeError, match="native: the C\\+\\+ step runs on CPU tensors"):
        backend_for(torch.device("meta"), "native")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="backend=triton on cpu: Triton runs on CUDA devices"):
            backend_for(torch.device("cpu"), "triton")


@settings(max_examples=30, deadline=None)
@given(data=st.lists(st.floats(-5, 5), min_size=3, max_size=8), seed=st.integers(0, 100))
def test_property_perturbed_grids_are_rejected(data, seed):
    """Swapping two grid points (non-monotone) or repeating one (duplicate) always raises."""
    sig = indis.grid_from_logits(torch.tensor(data, dtype=torch.float64), 0.01, 50.0)
    i = seed % (sig.numel() - 1)
    swapped = sig.clone()
    swapped[i], swapped[i + 1] = sig[i + 1], sig[i]
    dup = sig.clone()
    dup[i + 1] = sig[i]
    model, x, _ = _ok_args()
    for bad in (swapped, dup):
        with pytest.raises(ValueError, match="sigmas"):
            indis.sample(model, x.double(), bad, "dpmpp_2m")


def test_prepare_reuses_a_validated_table_by_value_and_only_that() -> None:
    """A repeated call with equal inputs reuses the table (and its layouts) even for another model of the same
    family, prediction and time input -- whose own outputs are then used; anything that decides the table
    makes another; x is still checked on a hit; gradients and the size bound are respected."""
    from indis.engine.core import sampling

    sampling.clear_plan_cache()
    model, x, sig = _ok_args()
    first = indis.prepare(model, x, sig, "unipc")
    again = indis.prepare(model, x, sig.clone(), "unipc")
    assert again.table is first.table and again.stages is first.stages
    other = indis.prepare(lambda x, s: x * 0.25, x, sig, "unipc")
    assert other.table is first.table
    torch.testing.assert_close(indis.run(other, x, backend="torch"),
                               indis.sample(lambda x, s: x * 0.25, x, sig, "unipc", backend="torch"))
    for changed in (dict(sigmas=sig * 0.5), dict(solver="dpmpp_2m"), dict(order=2), dict(x=x.double()),
                    dict(x=torch.cat([x, x])), dict(shift=[0.01] * (sig.numel() - 1))):
        kw = {"sigmas": sig, "solver": "unipc", "x": x, **changed}
        plan = indis.prepare(model, kw.pop("x"), kw.pop("sigmas"), kw.pop("solver"), **kw)
        assert plan.table is not first.table
    with pytest.raises(ValueError, match="x contains NaN"):
        indis.prepare(model, torch.full_like(x, float("nan")), sig, "unipc")
    vp = [indis.Denoiser(lambda x, t: x, indis.VPDiscrete.from_config(), "eps", "t") for _ in range(2)]
    grid = indis.get_sigmas("edm", 4, 0.05, 50.0)
    assert indis.prepare(vp[0], x, grid, "euler").table is indis.prepare(vp[1], x, grid, "euler").table
    leaf = sig.clone().requires_grad_(True)
    assert indis.prepare(model, x, leaf, "euler").table is not indis.prepare(model, x, leaf, "euler").table
    sampling.clear_plan_cache()
    for k in range(sampling.PLAN_CACHE_SIZE + 5):
        indis.prepare(model, x, sig * (1 - 0.001 * k), "euler")
    assert len(sampling._plans) == sampling.PLAN_CACHE_SIZE


def test_the_plan_cache_keys_what_decides_a_table() -> None:
    """No hit across: a list and a tensor grid of the same values (read differently), a Denoiser subclass
    with its own time map, a family changed after use, a family with a parameter that is not a value;
    nothing is cached under inference mode, a later call under autograd still works; a cached table does not
    keep a view of the caller's grid buffer."""
    from indis.engine.core import sampling

    sampling.clear_plan_cache()
    model, x, sig = _ok_args()
    vals = [14.6, 5.1, 0.7, 0.0]
    listed = indis.prepare(model, x, vals, "euler")
    tensor = indis.prepare(model, x, torch.tensor(vals, dtype=torch.float64), "euler")
    assert listed.table is not tensor.table

    class LogTime(indis.Denoiser):
        def time(self, sigma: torch.Tensor) -> torch.Tensor:
            return 0.25 * torch.log(sigma)

    plain = indis.Denoiser(lambda z, s: z, "ve")
    logged = LogTime(lambda z, s: z, "ve")
    assert indis.prepare(plain, x, sig, "euler").table is not indis.prepare(logged, x, sig, "euler").table
    expected = 0.25 * torch.log(sig[:-1].double())
    torch.testing.assert_close(indis.prepare(logged, x, sig, "euler").time, expected.expand(x.shape[0], -1))
    fam = indis.VPLinear()
    vp = indis.Denoiser(lambda z, t: z, fam, "eps", "t")
    grid = indis.get_sigmas("edm", 3, 0.05, 50.0)
    before = indis.prepare(vp, x, grid, "euler").time.clone()
    fam.beta_d = 10.0
    assert not torch.allclose(indis.prepare(vp, x, grid, "euler").time, before)
    fam.hook = lambda: None  # a parameter that is not a value: never cached
    assert indis.prepare(vp, x, grid, "euler").table is not indis.prepare(vp, x, grid, "euler").table
    sampling.clear_plan_cache()
    with torch.inference_mode():
        indis.sample(model, x, sig, "dpmpp_2m")
    assert not sampling._plans
    leaf = x.clone().requires_grad_(True)
    indis.sample(model, leaf, sig, "dpmpp_2m").sum().backward()
    assert leaf.grad is not None
    buf = sig.clone()
    first = indis.prepare(model, x, buf, "euler")
    buf.mul_(2.0)
    assert torch.equal(first.table.grid[0], sig)
