"""The coefficient table follows INDIS's corrected call, eps_hat = gamma * eps_theta(x_n, tau_n + dtau_n).

Checked against independent eps-form loops (``tests/reference/eps_form.py``), per family (VE x0 model, VP eps
model, flow velocity model) and solver (Euler, iPNDM), with random per-sample grids, shifts and scales.
"""

from __future__ import annotations

import math

import pytest
import torch

import indis
from indis.engine.core.families import VE, Denoiser, Flow, VPLinear
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
