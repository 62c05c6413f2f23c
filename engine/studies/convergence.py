"""Measured convergence orders of the solvers on exact testbeds (used by the tests and the order report).

* global order: error of a full sampling loop against the exact ODE end point on a Gaussian mixture, as N
  grows on uniform-lambda grids; the slope of log(error) against log(N).
* local order: one table stage fed the exact trajectory's state and history (single Gaussian, closed-form
  trajectory), so each multistep formula is measured without its warm-up steps; slope of the one-step
  error against the step size over the finest pair.
"""

from __future__ import annotations

import math

import torch

from indis.engine.core.families import VE
from indis.engine.core.sampling import sample
from indis.engine.core.schedules import get_sigmas
from indis.engine.core.solvers import build_table
from indis.engine.testbeds.mixtures import GaussianMixture, reference_solve

#: Global order of the full loop with the solvers' own warm-up. A first-order first step has O(h^2) local
#: error, which caps the global order of a multistep method at 2; UniPC's corrector lifts that step, so
#: UniPC-3 reaches 3. Fixed-coefficient iPNDM ignores step ratios: 2nd order on non-uniform grids.
GLOBAL_ORDER = {"euler": 1, "heun": 2, "ipndm": 2, "ipndm_v": 2, "dpmpp_2m": 2, "dpmpp_3m": 2, "unipc": 3}
GLOBAL_OPTS = {"dpmpp_2m": {"lower_order_final": False}, "dpmpp_3m": {"lower_order_final": False},
               "unipc": {"order": 3, "lower_order_final": False}}

#: (solver, order, table row) -> order of that formula. Row 0 is the next state; for UniPC row 1 is the
#: corrected state (UniC-p is one order above UniP-p). DPM-Solver++(3M) as published (DPM-Solver repo,
#: diffusers, k-diffusion's 3M SDE at eta = 0) weights D2 ~ h^2/2 D'' by phi_3 = (e^-h - 1 + h)/h^2 - 1/2,
#: half the Taylor-exact weight, so it is formally 2nd order; indis keeps the published formula for parity.
LOCAL_ORDER = {("ipndm_v", 2, 0): 2, ("ipndm_v", 3, 0): 3, ("ipndm_v", 4, 0): 4, ("dpmpp_2m", 2, 0): 2,
               ("dpmpp_3m", 3, 0): 2, ("unipc", 1, 0): 1, ("unipc", 2, 0): 2, ("unipc", 3, 0): 3,
               ("unipc", 1, 1): 2, ("unipc", 2, 1): 3, ("unipc", 3, 1): 4}


def fitted_order(ns: tuple[int, ...], errs: list[float]) -> float:
    """Least-squares slope of -log(err) against log(N)."""
    lx = torch.log(torch.tensor(ns, dtype=torch.float64))
    ly = torch.log(torch.tensor(errs, dtype=torch.float64))
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float(-(lx * ly).sum() / (lx * lx).sum())


def small_mixture(dim: int = 6, k: int = 3, seed: int = 0) -> GaussianMixture:
    """A small isotropic mixture with random means (the tests' default exact model)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=g, dtype=torch.float64)
    return GaussianMixture(means, torch.tensor([0.05, 0.1, 0.2][:k], dtype=torch.float64))


def global_errors(solver: str, ns: tuple[int, ...] = (16, 32, 64, 128), sigma_min: float = 0.05,
                  sigma_max: float = 20.0) -> list[float]:
    """Max-abs error of the full loop against the reference ODE solve, for each step count in ``ns``."""
    model = small_mixture()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * sigma_max
    ref = reference_solve(model, x, sigma_max, sigma_min)
    opts = GLOBAL_OPTS.get(solver, {})
    return [float((sample(model, x, get_sigmas("logsnr", n, sigma_min, sigma_max), solver, **opts) - ref)
                  .abs().max()) for n in ns]


def local_errors(solver: str, order: int, row: int,
                 hs: tuple[float, ...] = (0.02, 0.01, 0.005, 0.0025)) -> list[float]:
    """One-step errors of stage 4 of ``solver`` fed the exact trajectory of N(0, I), for step sizes ``hs``."""

    def exact(sigma: torch.Tensor) -> torch.Tensor:  # x(sigma) through x(1) = 1.7 for N(0, c I), c = 1
        return 1.7 * torch.sqrt((1 + sigma**2) / 2)

    n, errs = 4, []
    for h in hs:
        sig = torch.exp(-(0.3 + h * torch.arange(n + 2, dtype=torch.float64))).unsqueeze(0)
        opts = {"order": order} if solver in ("ipndm_v", "unipc") else {}
        table = build_table(solver, sig, VE(), lower_order_final=False, **opts)
        states = [exact(sig[0, j]) for j in range(n + 2)]
        outs = [states[j] / (1 + sig[0, j] ** 2) for j in range(n + 1)]  # exact x0 = x c / (c + sigma^2)
        conv = [table.conv[0, j, 0] * states[j] + table.conv[0, j, 1] * outs[j] for j in range(n + 1)]
        inputs = [states[n], states[n - 1], conv[n]] + [conv[n - j] for j in range(1, 4)]  # stash: previous
        out = sum(table.coef[0, n, row, i] * inputs[i] for i in range(table.coef.shape[-1]))
        errs.append(float(abs(out - (states[n + 1] if row == 0 else states[n]))))
    return errs


def local_order(solver: str, order: int, row: int) -> float:
    """Measured order of a formula: (slope of the one-step error over the finest pair) - 1."""
    errs = local_errors(solver, order, row)
    return math.log2(errs[-2] / errs[-1]) - 1


def main() -> None:
    ns = (16, 32, 64, 128)
    print("## Global order (full loop, exact 3-component GMM, uniform-lambda grids, sigma 20 -> 0.05)\n")
    print("| solver | expected | measured | errors at N = " + ", ".join(map(str, ns)) + " |")
    print("|---|---|---|---|")
    for solver, expected in GLOBAL_ORDER.items():
        errs = global_errors(solver, ns)
        print(f"| {solver} | {expected} | {fitted_order(ns, errs):.2f} | "
              + ", ".join(f"{e:.1e}" for e in errs) + " |")
    print("\n## Local order (one table stage on the exact trajectory)\n")
    print("| solver | order option | row | expected | measured |")
    print("|---|---|---|---|---|")
    for (solver, order, row), expected in LOCAL_ORDER.items():
        name = "next state" if row == 0 else "corrected state (UniC)"
        print(f"| {solver} | {order} | {name} | {expected} | {local_order(solver, order, row):.2f} |")


if __name__ == "__main__":
    main()
