"""The contract every registered solver (``SOLVERS``) meets; a solver gets these tests by being registered.

* ragged = separate: one batched call with per-sample grids, shifts and scales equals each sample run alone,
  on every backend this machine has (torch; native where the C++ step is built; triton interpreted under
  ``TRITON_INTERPRET=1``, compiled on CUDA);
* convergence: the fitted global order on an exact Gaussian mixture (reference ODE solve) reaches the
  solver's nominal order (``GLOBAL_ORDER``) less a small tolerance;
* errors: bad grids and bad option names or values raise ``ValueError`` saying what is wrong;
* dtypes: float32, float16 and bfloat16 states give finite results of their own dtype, within a few dozen
  of that dtype's epsilons of the float64 result.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import indis
from indis.engine.core.families import Denoiser, Flow
from indis.engine.core.schedules import get_sigmas
from indis.engine.core.solvers import DEFAULT_ORDER, DERIVATIVE_SOLVERS, MAX_ORDER, SOLVERS
from indis.engine.studies.convergence import GLOBAL_OPTS, GLOBAL_ORDER, fitted_order, small_mixture
from indis.engine.testbeds.mixtures import reference_solve
from indis.kernels import native
from indis.kernels.ragged_step import fused
from tests.helpers import IDS, KERNEL_DEVICE, SOLVER_CASES
from tests.helpers import flow_velocity as _flow_velocity
from tests.helpers import ok_args as _ok_args
from tests.helpers import ragged_grids as _ragged_grids

#: Solvers whose order is an option (the others have a fixed order).
ADJUSTABLE = tuple(s for s in SOLVERS if s in DEFAULT_ORDER)


def test_every_registered_solver_has_its_contract_data() -> None:
    """A new solver must come with its nominal order and appear in the shared solver cases."""
    assert set(MAX_ORDER) == set(SOLVERS)
    assert set(GLOBAL_ORDER) == set(SOLVERS)
    assert {name for name, _ in SOLVER_CASES} == set(SOLVERS)
    assert all(1 <= GLOBAL_ORDER[s] <= MAX_ORDER[s] for s in SOLVERS)
    assert set(DERIVATIVE_SOLVERS) <= set(SOLVERS) and set(DEFAULT_ORDER) <= set(SOLVERS)


# ------------------------------------------------------------------------------------ ragged = separate
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


def _backend_device(backend: str) -> torch.device:
    """The device ``backend`` runs on here, or a skip saying why it cannot run."""
    if backend == "native":
        if not native.available():
            pytest.skip(native.REASON)
        return torch.device("cpu")
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        if KERNEL_DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton on the CPU needs TRITON_INTERPRET=1")
        return KERNEL_DEVICE
    return torch.device("cpu")


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_ragged_batch_equals_separate_runs_on_every_backend(solver: str, backend: str) -> None:
    """The same ragged = separate check through each backend's own step (triton stores float32)."""
    device = _backend_device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    assert backend == "torch" or fused(backend, dtype)  # the backend's fused step really runs
    model = small_mixture().to(device)
    bsz, steps = 3, 4
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(bsz, 6, generator=g, dtype=torch.float64) * 80.0).to(device, dtype)
    grids = _ragged_grids(bsz, steps, seed=12).to(device)
    shift = (0.1 * torch.randn(bsz, steps, generator=g, dtype=torch.float64)).to(device)
    scale = (1 + 0.05 * torch.randn(bsz, steps, generator=g, dtype=torch.float64)).to(device)
    batched = indis.sample(model, x, grids, solver, shift=shift, scale=scale, backend=backend)
    assert batched.dtype == dtype and torch.isfinite(batched).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for i in range(bsz):
        alone = indis.sample(model, x[i : i + 1], grids[i], solver, shift=shift[i], scale=scale[i],
                             backend=backend)
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=tol, atol=tol)
    assert not torch.allclose(batched[0], batched[1])  # the grids really differ per sample
    if backend != "torch":  # and the backend computes what the torch reference does
        ref = indis.sample(model, x.double(), grids, solver, shift=shift, scale=scale, backend="torch")
        close = 1e-4 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(batched.double(), ref, rtol=close, atol=close)


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


# ------------------------------------------------------------------------------------------ convergence
@pytest.fixture(scope="module")
def global_case() -> tuple:
    """``studies.convergence.global_errors``'s set-up, with its reference ODE solve done once for all
    solvers: the mixture, x_T, the exact end point and the sigma range."""
    sigma_min, sigma_max = 0.05, 20.0
    model = small_mixture()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * sigma_max
    return model, x, reference_solve(model, x, sigma_max, sigma_min), sigma_min, sigma_max


@pytest.mark.parametrize("solver", SOLVERS)
def test_global_convergence_order(solver: str, global_case: tuple) -> None:
    """Max-abs error of the full loop against the exact end point on uniform-lambda grids of N steps: the
    slope of log(error) against log(N) reaches the solver's nominal global order."""
    model, x, ref, sigma_min, sigma_max = global_case
    ns = (16, 32, 64, 128)
    opts = GLOBAL_OPTS.get(solver, {})
    grids = [get_sigmas("logsnr", n, sigma_min, sigma_max) for n in ns]
    errs = [float((indis.sample(model, x, grid, solver, **opts) - ref).abs().max()) for grid in grids]
    order = fitted_order(ns, errs)
    assert order > GLOBAL_ORDER[solver] - 0.15, f"{solver}: fitted order {order:.2f}"


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(("sigmas", "match"), [
    ([10.0, 1.0, 1.0, 0.1], "duplicated"),
    ([10.0, 0.1, 1.0], "descending"),
    ([10.0, float("nan"), 0.1], "NaN"),
    ([float("inf"), 1.0, 0.1], "inf"),
    ([10.0, 0.0, 0.1], "positive|descending"),
    ([10.0], "at least 2"),
    ([[10.0, 1.0, 0.1], [10.0, 1.0, 0.1], [10.0, 1.0, 0.1]], "rows"),
])
@pytest.mark.parametrize("solver", SOLVERS)
def test_bad_grids_raise_naming_sigmas(solver: str, sigmas, match) -> None:
    model, x, _ = _ok_args()
    with pytest.raises(ValueError, match=match) as info:
        indis.sample(model, x, torch.tensor(sigmas, dtype=torch.float64), solver)
    assert "sigmas" in str(info.value) or "timesteps" in str(info.value)


@pytest.mark.parametrize("solver", SOLVERS)
def test_an_unknown_solver_option_raises_naming_it(solver: str) -> None:
    model, x, sig = _ok_args()
    with pytest.raises(ValueError, match=r"unknown solver options \['frobnicate'\] for solver='"):
        indis.sample(model, x, sig, solver, frobnicate=1)


@pytest.mark.parametrize("solver", SOLVERS)
def test_an_order_outside_the_solvers_range_raises(solver: str) -> None:
    model, x, sig = _ok_args()
    for order in (0, MAX_ORDER[solver] + 1):
        with pytest.raises(ValueError, match=f"order={order} .*{solver}"):
            indis.sample(model, x, sig, solver, order=order)
    if solver in ADJUSTABLE:  # an adjustable order must be an int
        with pytest.raises(ValueError, match=f"order='2' for {solver} must be an int"):
            indis.sample(model, x, sig, solver, order="2")
    for order in ("2", float(MAX_ORDER[solver]), True):  # every solver: an order is an int, nothing else
        with pytest.raises(ValueError, match=f"order={order!r} .*{solver}"):
            indis.sample(model, x, sig, solver, order=order)


@pytest.mark.parametrize("solver", SOLVERS)
def test_an_order_needs_as_many_steps(solver: str) -> None:
    """An explicit order above the number of steps is an error for a solver whose order is an option; a
    fixed-order solver accepts its own order on any grid (and gives its default result)."""
    model, x, sig = _ok_args()
    short = sig[: MAX_ORDER[solver]]  # MAX_ORDER - 1 steps (at least one)
    if solver in ADJUSTABLE:
        with pytest.raises(ValueError, match=f"order={MAX_ORDER[solver]} needs at least .*NFE too small"):
            indis.sample(model, x, short, solver, order=MAX_ORDER[solver])
    else:
        torch.testing.assert_close(indis.sample(model, x, sig, solver, order=MAX_ORDER[solver]),
                                   indis.sample(model, x, sig, solver), rtol=0, atol=0)


@pytest.mark.parametrize(("option", "match"), [({"variant": "bh3"}, "variant='bh3' must be 'bh1' or 'bh2'"),
                                               ({"frame": "edm"}, "frame='edm' is not 've' or 'flow'")])
@pytest.mark.parametrize("solver", SOLVERS)
def test_bad_option_values_raise(solver: str, option: dict, match: str) -> None:
    model, x, sig = _ok_args()
    with pytest.raises(ValueError, match=match):
        indis.sample(model, x, sig, solver, **option)


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_ve_frame_start_at_infinity_raises_for_derivative_solvers(solver: str) -> None:
    """A derivative solver cannot integrate the VE frame from sigma = inf; an exponential integrator does
    not use the frame and starts there finitely."""
    den = Denoiser(lambda x, t: x, Flow(), "velocity", "t")
    grid = torch.tensor([math.inf, 1.0, 0.0])
    if solver in DERIVATIVE_SOLVERS:
        with pytest.raises(ValueError, match=f"{solver} in the 've' frame cannot start at sigma = inf"):
            indis.sample(den, torch.zeros(1, 2), grid, solver, frame="ve")
    else:
        x = torch.randn(1, 2, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(indis.sample(den, x, grid, solver, frame="ve")).all()


@pytest.mark.parametrize("solver", SOLVERS)
def test_flow_model_starts_at_t_equal_one(solver: str) -> None:
    """A velocity model at t = 1 (sigma = inf) samples finitely and matches a start just below 1 (except
    multistep exponential integrators, which reduce their order at the infinite point)."""
    fam = Flow()
    den = Denoiser(_flow_velocity(small_mixture()), fam, "velocity", "t")
    eps = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = torch.linspace(1.0, 0.02, 9, dtype=torch.float64)
    t_near = t.clone()
    t_near[0] = 1 - 1e-9
    a = indis.sample(den, eps, indis.as_grid(timesteps=t, family=fam)[0], solver)
    b = indis.sample(den, eps, indis.as_grid(timesteps=t_near, family=fam)[0], solver)
    assert torch.isfinite(a).all(), solver
    if solver in DERIVATIVE_SOLVERS or MAX_ORDER[solver] == 1:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=solver)


# ------------------------------------------------------------------------------------------------ dtypes
#: Bound on max|x_dtype - x_float64| / max|x_float64|, in units of the dtype's epsilon (measured on this case:
#: at most 19 for Heun in float16, 13 for iPNDM; 1 to 4 for the exponential integrators).
DTYPE_TOL_EPS = 48


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("solver", SOLVERS)
def test_low_precision_states_stay_finite_and_close_to_float64(solver: str, dtype: torch.dtype) -> None:
    """The state's dtype is the dtype of the result, and it differs from float64's by rounding only (ragged
    grids down to sigma = 0.05, with shift and scale; the default backend)."""
    model = small_mixture()
    g = torch.Generator().manual_seed(21)
    x64 = torch.randn(4, 6, generator=g, dtype=torch.float64) * 80.0
    grids = _ragged_grids(4, 6, seed=22, smin=0.05)
    shift = 0.1 * torch.tanh(torch.randn(4, 6, generator=g, dtype=torch.float64))
    scale = 1 + 0.05 * torch.tanh(torch.randn(4, 6, generator=g, dtype=torch.float64))
    ref = indis.sample(model, x64, grids, solver, shift=shift, scale=scale)
    out = indis.sample(model, x64.to(dtype), grids, solver, shift=shift, scale=scale)
    assert ref.dtype == torch.float64 and out.dtype == dtype and out.shape == x64.shape
    assert torch.isfinite(out).all()
    err = float((out.double() - ref).abs().max() / ref.abs().max())
    assert err <= DTYPE_TOL_EPS * torch.finfo(dtype).eps, f"{solver} in {dtype}: relative error {err:.2e}"
