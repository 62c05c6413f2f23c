"""Solver coefficient tables (``indis.engine.core.solvers``).

The table follows INDIS's corrected call, eps_hat = gamma * eps_theta(x_n, tau_n + dtau_n): checked against
independent eps-form loops (``tests/reference/eps_form.py``), per family (VE x0 model, VP eps model, flow
velocity model) and solver (Euler, iPNDM), with random per-sample grids, shifts and scales. Also: the local
order of each multistep formula, iPNDM-v on a uniform frame grid, the VP change of variables.
"""

from __future__ import annotations

import math

import pytest
import torch

import indis
from indis.engine.core.families import VE, Denoiser, Flow, VPLinear
from indis.engine.studies.convergence import LOCAL_ORDER, local_order, small_mixture
from tests.helpers import IDS, SOLVER_CASES
from tests.reference import eps_form

FAMILIES = {"ve": (VE(), "x0"), "vp": (VPLinear(), "eps"), "flow": (Flow(), "velocity")}
SIGMA = {"ve": (0.002, 80.0), "vp": (0.01, 50.0), "flow": (0.002, 80.0)}


def _net(family: str):
    """A smooth nonlinear network of the family's prediction type, called on (state, sigma[B])."""
    w = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)

    def net(y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.reshape(-1, 1)
        c = torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))
        return torch.tanh(y * (0.3 + 0.2 * c)) + 0.1 * w * c + 0.05 * y.roll(1, dims=-1)

    return net


def _case(family: str, seed: int, infinite_start: bool = False):
    bsz, steps = 4, 5
    g = torch.Generator().manual_seed(seed)
    smin, smax = SIGMA[family]
    grids = indis.grid_from_logits(torch.randn(bsz, steps + 1, generator=g, dtype=torch.float64), smin, smax)
    if infinite_start:
        grids = torch.cat([torch.full((bsz, 1), math.inf, dtype=torch.float64), grids[:, 1:]], dim=1)
    shift = 0.1 * torch.tanh(torch.randn(bsz, steps, generator=g, dtype=torch.float64))
    scale = 1 + 0.05 * torch.tanh(torch.randn(bsz, steps, generator=g, dtype=torch.float64))
    noise = torch.randn(bsz, 6, generator=g, dtype=torch.float64)
    fam = FAMILIES[family][0]
    y = noise * fam.s(grids[:, :1])
    return grids, shift, scale, y


def _reference(family: str, solver: str, frame: str, grids, shift, scale, y) -> torch.Tensor:
    net = _net(family)

    def call(v: torch.Tensor, sigma: float) -> torch.Tensor:
        return net(v.unsqueeze(0), torch.tensor([sigma], dtype=torch.float64))[0]

    rows = []
    for i in range(y.shape[0]):
        args = (call, family, y[i], grids[i].tolist(), shift[i].tolist(), scale[i].tolist())
        rows.append(eps_form.euler(*args) if solver == "euler" else eps_form.ipndm(*args, frame=frame))
    return torch.stack(rows)


CASES = [("ve", "euler", "ve"), ("vp", "euler", "ve"), ("flow", "euler", "flow"),
         ("ve", "ipndm", "ve"), ("vp", "ipndm", "ve"), ("flow", "ipndm", "flow"), ("ve", "ipndm", "flow"),
         ("flow", "ipndm", "ve")]


@pytest.mark.parametrize(("family", "solver", "frame"), CASES)
def test_table_matches_the_eps_form_definition(family: str, solver: str, frame: str) -> None:
    grids, shift, scale, y = _case(family, seed=3)
    fam, prediction = FAMILIES[family]
    den = Denoiser(_net(family), fam, prediction, "sigma")
    ours = indis.sample(den, y, grids, solver, shift=shift, scale=scale, frame=frame, backend="torch")
    ref = _reference(family, solver, frame, grids, shift, scale, y)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    plain = indis.sample(den, y, grids, solver, frame=frame, backend="torch")
    assert (ours - plain).abs().max() > 1e-3  # shift and scale really act


@pytest.mark.parametrize("solver", ["euler", "ipndm"])
def test_flow_start_at_t_one_matches_the_eps_form_definition(solver: str) -> None:
    grids, shift, scale, y = _case("flow", seed=5, infinite_start=True)
    den = Denoiser(_net("flow"), Flow(), "velocity", "sigma")
    ours = indis.sample(den, y, grids, solver, shift=shift, scale=scale, backend="torch")
    ref = _reference("flow", solver, "flow", grids, shift, scale, y)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_euler_relative_error_below_1e9_in_every_sample() -> None:
    """The acceptance check: Euler, random per-sample grids/shifts/scales, relative error <= 1e-9."""
    for family in FAMILIES:
        grids, shift, scale, y = _case(family, seed=11)
        fam, prediction = FAMILIES[family]
        ours = indis.sample(Denoiser(_net(family), fam, prediction, "sigma"), y, grids, "euler", shift=shift,
                            scale=scale, backend="torch")
        ref = _reference(family, "euler", "ve", grids, shift, scale, y)
        rel = (ours - ref).norm(dim=1) / ref.norm(dim=1)
        assert float(rel.max()) < 1e-9, family


def test_the_shift_moves_only_the_evaluation_point_and_the_scale_multiplies_eps() -> None:
    """A model whose noise prediction ignores sigma (D = x - sigma c): the step uses eps_hat = gamma c, so a
    shift changes nothing (an x0-scaled definition would step with exp(dtau) c) and gamma scales it."""
    def model(x, sigma):
        return x - sigma.view(-1, 1) * 0.5

    x = torch.full((1, 3), 2.0, dtype=torch.float64)
    sig = torch.tensor([4.0, 1.0], dtype=torch.float64)
    shifted = indis.sample(model, x, sig, "euler", shift=torch.tensor([0.2], dtype=torch.float64))
    torch.testing.assert_close(shifted, x + (1.0 - 4.0) * 0.5, rtol=1e-14, atol=1e-14)
    scaled = indis.sample(model, x, sig, "euler", shift=torch.tensor([0.2], dtype=torch.float64),
                          scale=torch.tensor([1.1], dtype=torch.float64))
    torch.testing.assert_close(scaled, x + (1.0 - 4.0) * 0.5 * 1.1, rtol=1e-14, atol=1e-14)


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


def _table_cases():
    """(family, prediction, grids, shift, scale) with per-sample grids: VE with shift and scale, VP eps ending
    at 0, flow velocity from t = 1 (sigma = inf) with shift, and a 3-step grid (warm-up and final rules
    overlap)."""
    from tests.helpers import ragged_grids

    g = torch.Generator().manual_seed(11)
    ve = ragged_grids(3, 7, seed=2)
    vp = ragged_grids(3, 6, seed=3, smin=0.01, smax=50.0)
    vp = torch.cat([vp, torch.zeros(3, 1, dtype=torch.float64)], 1)
    flow = ragged_grids(3, 6, seed=4, smin=0.01, smax=20.0)
    flow = torch.cat([torch.full((3, 1), math.inf, dtype=torch.float64), flow[:, 1:]], 1)
    short = ragged_grids(2, 3, seed=5)
    one_to_zero = torch.tensor([[10.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    return [("ve", "x0", ve, 0.1 * torch.randn(3, 7, generator=g, dtype=torch.float64),
             1 + 0.05 * torch.randn(3, 7, generator=g, dtype=torch.float64)),
            ("vp_linear", "eps", vp, None, None),
            ("flow", "velocity", flow, 0.05 * torch.randn(3, 6, generator=g, dtype=torch.float64), None),
            ("ve", "x0", short, None, None), ("ve", "x0", one_to_zero, None, None)]


@pytest.mark.parametrize(("solver", "opts"), SOLVER_CASES, ids=IDS)
def test_tables_equal_the_step_by_step_construction(solver: str, opts: dict) -> None:
    """The tables built over all steps at once equal the step-by-step construction (``tests/reference``),
    values to 1e-12 and structure exactly, for every solver and option case, per-sample grids, shifts and
    scales, VP eps to sigma = 0 and flow from t = 1."""
    from indis.engine.core.solvers import build_table
    from tests.reference.solver_tables import reference_table

    for fam_name, prediction, grid, shift, scale in _table_cases():
        fam = indis.get_family(fam_name)
        kw = dict(prediction=prediction, shift=shift, scale=scale, **opts)
        if "order" in opts and opts["order"] > grid.shape[-1] - 1:
            continue
        if fam_name == "flow" and solver in ("heun", "ipndm", "ipndm_v") and opts.get("frame") == "ve":
            continue
        new, ref = build_table(solver, grid, fam, **kw), reference_table(solver, grid, fam, **kw)
        for field in ("grid", "sigma_eval", "in_scale", "conv", "coef"):
            torch.testing.assert_close(getattr(new, field), getattr(ref, field), rtol=1e-12, atol=1e-12,
                                       msg=f"{fam_name} {field}")
        for field in ("support", "conv_uses_state", "conv_scales_raw", "scaled_input", "step_of_stage",
                      "point_of_stage", "history", "uses_stash"):
            assert getattr(new, field) == getattr(ref, field), (fam_name, field)
