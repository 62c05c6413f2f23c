"""Ragged = separate, convergence order, INDIS shift/scale semantics, and bad-input errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import indis
from indis.engine.core.families import Denoiser, Flow, VPLinear
from indis.engine.studies.convergence import (
    GLOBAL_ORDER,
    LOCAL_ORDER,
    fitted_order,
    global_errors,
    local_order,
    small_mixture,
)
from indis.engine.testbeds.mixtures import GaussianMixture

SOLVER_CASES = [
    ("euler", {}), ("heun", {}), ("ipndm", {}), ("ipndm", {"order": 2}), ("ipndm_v", {}),
    ("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {"variant": "bh1", "order": 3}),
    ("unipc", {"variant": "bh2", "order": 3}), ("unipc", {"variant": "bh2", "corrector": False}),
]
IDS = [f"{s}-{'-'.join(f'{k}{v}' for k, v in o.items())}" for s, o in SOLVER_CASES]


def _ragged_grids(bsz: int, steps: int, seed: int, smin: float = 0.002, smax: float = 80.0) -> torch.Tensor:
    """Random strictly descending grids, one per sample, through the monotone logit map."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(bsz, steps + 1, generator=g, dtype=torch.float64)
    return indis.grid_from_logits(logits, smin, smax, space="lambda")


@pytest.mark.parametrize(("solver", "opts"), SOLVER_CASES, ids=IDS)
def test_ragged_batch_equals_separate_runs(solver: str, opts: dict) -> None:
    """One batched call with per-sample grids, shifts and scales == each sample run alone (float64)."""
    model = small_mixture()
    bsz, steps = 5, 6
    g = torch.Generator().manual_seed(1)
    x = torch.randn(bsz, 6, generator=g, dtype=torch.float64) * 80.0
    grids = _ragged_grids(bsz, steps, seed=2)
    shift = 0.1 * torch.randn(bsz, steps, generator=g, dtype=torch.float64)
    scale = 1 + 0.05 * torch.randn(bsz, steps, generator=g, dtype=torch.float64)
    batched = indis.sample(model, x, grids, solver, shift=shift, scale=scale, **opts)
    for i in range(bsz):
        alone = indis.sample(model, x[i : i + 1], grids[i], solver, shift=shift[i], scale=scale[i], **opts)
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(batched[0], batched[1])  # the grids really differ per sample


@pytest.mark.parametrize("solver", list(GLOBAL_ORDER))
def test_global_convergence_order(solver: str) -> None:
    ns = (16, 32, 64, 128)
    order = fitted_order(ns, global_errors(solver, ns))
    assert order > GLOBAL_ORDER[solver] - 0.15, f"{solver}: fitted order {order:.2f}"


@pytest.mark.parametrize(("solver", "order", "row"), list(LOCAL_ORDER))
def test_local_order_of_the_coefficient_table(solver: str, order: int, row: int) -> None:
    """One table stage fed the exact state and history has the formula's order (see engine/convergence)."""
    measured = local_order(solver, order, row)
    assert abs(measured - LOCAL_ORDER[(solver, order, row)]) < 0.3, f"measured order {measured:.2f}"


def test_ipndm_v_equals_ipndm_on_uniform_frame_grid() -> None:
    model = small_mixture()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 10
    sig = torch.linspace(10.0, 0.1, 9, dtype=torch.float64)  # uniform in sigma = the VE frame's time
    torch.testing.assert_close(indis.sample(model, x, sig, "ipndm_v"), indis.sample(model, x, sig, "ipndm"),
                               rtol=1e-12, atol=1e-12)


def test_shift_changes_the_network_time_and_scale_multiplies_eps() -> None:
    calls = []

    def model(x, sigma):
        calls.append(sigma.clone())
        return 0.5 * x

    x = torch.ones(2, 3, dtype=torch.float64)
    sig = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)
    shift = torch.tensor([[0.1, -0.2], [0.0, 0.3]], dtype=torch.float64)
    out = indis.sample(model, x, sig, "euler", shift=shift)
    assert torch.allclose(calls[0], sig[0] * torch.exp(shift[:, 0]))
    assert torch.allclose(calls[1], sig[1] * torch.exp(shift[:, 1]))
    # Euler step with D = 0.5 x, eps = 0.5 x / sigma scaled by gamma: x' = x + (sigma' - sigma) gamma eps.
    scale = torch.tensor([1.2, 0.9], dtype=torch.float64)
    y = indis.sample(model, x[:1], sig[:2], "euler", scale=scale[:1])
    torch.testing.assert_close(y, x[:1] + (sig[1] - sig[0]) * 1.2 * 0.5 * x[:1] / sig[0])
    assert out.shape == x.shape


def _flow_velocity(gmm: GaussianMixture):
    """Exact velocity eps - x0 of a GMM in flow coordinates, finite at t = 1."""
    def velocity(x_t, t):
        return (x_t - gmm.denoise_scaled(x_t, 1 - t, t)) / t.view(-1, 1)

    return velocity


def test_flow_model_starts_at_t_equal_one() -> None:
    """A velocity model at t = 1 (sigma = inf) samples finitely and matches a start just below 1."""
    fam = Flow()
    den = Denoiser(_flow_velocity(small_mixture()), fam, "velocity", "t")
    eps = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = torch.linspace(1.0, 0.02, 9, dtype=torch.float64)
    t_near = t.clone()
    t_near[0] = 1 - 1e-9
    for solver in indis.SOLVERS:
        a = indis.sample(den, eps, indis.as_grid(timesteps=t, family=fam)[0], solver)
        b = indis.sample(den, eps, indis.as_grid(timesteps=t_near, family=fam)[0], solver)
        assert torch.isfinite(a).all(), solver
        if solver not in ("dpmpp_2m", "dpmpp_3m", "unipc"):  # these reduce order at the infinite point
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=solver)


def test_vp_wrapper_matches_plain_denoiser() -> None:
    """An eps-model wrapped as VP gives the VE trajectory scaled by alpha (exponential integrators)."""
    gmm = small_mixture()
    fam = VPLinear()

    def eps_net(x_vp, t):
        sigma = fam.sigma(t).view(-1, 1)
        x_ve = x_vp * torch.sqrt(1 + sigma**2)
        return (x_ve - gmm(x_ve, sigma.flatten())) / sigma

    den = Denoiser(eps_net, fam, "eps", "t")
    sig = indis.get_sigmas("logsnr", 6, 0.01, 50.0)
    x_ve = torch.randn(2, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 50.0
    shift = 0.2 * torch.randn(2, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for solver in ("euler", "dpmpp_2m", "dpmpp_3m", "unipc"):
        for s in (None, shift):  # a shift rescales the VP input by alpha(sigma_eval) / alpha(sigma_n)
            ve = indis.sample(gmm, x_ve, sig, solver, shift=s)
            vp = indis.sample(den, x_ve * fam.alpha(sig[:1]), sig, solver, shift=s)
            torch.testing.assert_close(vp, ve * fam.alpha(sig[-1:]), rtol=1e-10, atol=1e-10, msg=solver)


# ------------------------------------------------------------------------------------------- bad input
def _ok_args():
    return (lambda x, s: x), torch.zeros(2, 3), torch.tensor([10.0, 1.0, 0.1])


@pytest.mark.parametrize(("sigmas", "match"), [
    ([10.0, 1.0, 1.0, 0.1], "duplicated"),
    ([10.0, 0.1, 1.0], "descending"),
    ([10.0, float("nan"), 0.1], "NaN"),
    ([float("inf"), 1.0, 0.1], "inf"),
    ([10.0, 0.0, 0.1], "positive|descending"),
    ([10.0], "at least 2"),
    ([[10.0, 1.0, 0.1], [10.0, 1.0, 0.1], [10.0, 1.0, 0.1]], "rows"),
])
def test_bad_grids_raise_naming_sigmas(sigmas, match) -> None:
    model, x, _ = _ok_args()
    with pytest.raises(ValueError, match=match) as info:
        indis.sample(model, x, torch.tensor(sigmas, dtype=torch.float64), "euler")
    assert "sigmas" in str(info.value) or "timesteps" in str(info.value)


def test_grid_outside_family_range_raises() -> None:
    fam = VPLinear()
    den = Denoiser(lambda x, t: x, fam, "eps", "t")
    with pytest.raises(ValueError, match="outside the family's range"):
        indis.sample(den, torch.zeros(1, 2), torch.tensor([1e4, 1.0]), "euler")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"solver": "dpm_fast"}, "solver='dpm_fast' is unknown"),
    ({"solver": "ipndm", "order": 5}, "order=5"),
    ({"solver": "unipc", "order": 3}, "NFE too small"),
    ({"solver": "unipc", "variant": "bh3"}, "variant"),
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
    from indis.engine.core.families import Flow

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
    from indis.engine.core.families import Flow, VPCosine

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


def test_heun_ve_frame_at_infinity_raises() -> None:
    den = Denoiser(lambda x, t: x, Flow(), "velocity", "t")
    with pytest.raises(ValueError, match="cannot start at sigma = inf"):
        indis.sample(den, torch.zeros(1, 2), torch.tensor([math.inf, 1.0, 0.0]), "heun", frame="ve")


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(1, 7), bsz=st.integers(1, 4), dim=st.integers(1, 5), seed=st.integers(0, 2**16),
       solver=st.sampled_from(indis.SOLVERS), final_zero=st.booleans())
def test_property_random_grids_are_finite_and_ragged_consistent(steps, bsz, dim, seed, solver, final_zero):
    """Any valid ragged grid gives finite samples, and row 0 of the batch equals sample 0 run alone."""
    if final_zero and steps < 2:
        steps = 2
    model = small_mixture(dim=dim, seed=seed % 7)
    g = torch.Generator().manual_seed(seed)
    grids = _ragged_grids(bsz, steps - 1 if final_zero else steps, seed)
    if final_zero:
        grids = torch.cat([grids, grids.new_zeros(bsz, 1)], dim=1)
    x = torch.randn(bsz, dim, generator=g, dtype=torch.float64) * 80.0
    out = indis.sample(model, x, grids, solver)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out[:1], indis.sample(model, x[:1], grids[0], solver), rtol=1e-12, atol=1e-12)


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
