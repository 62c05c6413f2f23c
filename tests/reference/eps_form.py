"""Independent eps-form loops of INDIS's corrected network call, one sample at a time (float64).

Written from the paper's definition, not from ``indis.engine.core.solvers``: each step calls the network at
``sigma_eval = sigma_n * exp(dtau_n)`` on the same point x_n, takes *that call's own noise prediction* in the
model's family (a VE x0 model: ``(x - D) / sigma_eval``; a VP eps model: its output; a flow velocity model:
``x_t + (1 - t) v``), multiplies it by ``gamma_n`` and steps on the unshifted grid with it:

* Euler = DDIM in eps form, in the family's coordinate ``y = alpha x0 + s eps``:
  ``x0_hat = (y - s_n eps_hat) / alpha_n``, ``y' = alpha_{n+1} x0_hat + s_{n+1} eps_hat``;
* iPNDM (fixed Adams-Bashforth 1..4 with warm-up) on ``dz/dtau = (z - x0_hat) / tau``: in the VE frame
  ``z = x``, ``tau = sigma``, so the derivative is ``eps_hat`` itself; in the flow frame ``z = x_t``,
  ``tau = t``.

At a flow model's t = 1 (sigma = inf) eps is the state itself and x0_hat the network's x0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _alpha_s(family: str, sigma: float) -> tuple[float, float]:
    if family == "ve":
        return 1.0, sigma
    if family == "vp":
        return 1 / math.sqrt(1 + sigma * sigma), sigma / math.sqrt(1 + sigma * sigma)
    if math.isinf(sigma):  # flow at t = 1
        return 0.0, 1.0
    return 1 / (1 + sigma), sigma / (1 + sigma)


def corrected_call(net: Callable[[Tensor, float], Tensor], family: str, y: Tensor, sigma: float, dtau: float,
                   gamma: float) -> tuple[Tensor, Tensor]:
    """``(eps_hat, x0_hat)`` at state ``y`` (family coordinate) and grid point ``sigma``.

    ``net(y_eval, sigma_eval)`` returns the family's raw output: x0 (ve), eps (vp), velocity (flow)."""
    alpha, s = _alpha_s(family, sigma)
    if math.isinf(sigma):  # flow t = 1: x_t is the noise, nothing to shift or scale
        v = net(y, sigma)
        return y, y - v
    sigma_e = sigma * math.exp(dtau)
    alpha_e, s_e = _alpha_s(family, sigma_e)
    y_e = y * (alpha_e / alpha)  # the same point x_n, written in the family's coordinate at sigma_eval
    raw = net(y_e, sigma_e)
    if family == "ve":
        eps = (y_e - raw) / sigma_e
    elif family == "vp":
        eps = raw
    else:
        t_e = sigma_e / (1 + sigma_e)
        eps = y_e + (1 - t_e) * raw
    eps_hat = gamma * eps
    return eps_hat, (y - s * eps_hat) / alpha


def euler(net: Callable[[Tensor, float], Tensor], family: str, y: Tensor, grid: list[float],
          shift: list[float], scale: list[float]) -> Tensor:
    """DDIM in eps form with INDIS's corrected call (one sample, family coordinate)."""
    for n in range(len(grid) - 1):
        eps_hat, x0_hat = corrected_call(net, family, y, grid[n], shift[n], scale[n])
        alpha1, s1 = _alpha_s(family, grid[n + 1])
        y = alpha1 * x0_hat + s1 * eps_hat
    return y


def ipndm(net: Callable[[Tensor, float], Tensor], family: str, y: Tensor, grid: list[float],
          shift: list[float], scale: list[float], frame: str, order: int = 4) -> Tensor:
    """Fixed-coefficient iPNDM with INDIS's corrected call, in the ``ve`` or ``flow`` frame."""
    derivs: list[Tensor] = []
    for n in range(len(grid) - 1):
        eps_hat, x0_hat = corrected_call(net, family, y, grid[n], shift[n], scale[n])
        alpha, _ = _alpha_s(family, grid[n])
        alpha1, _ = _alpha_s(family, grid[n + 1])
        if frame == "ve":
            z, tau, tau1 = y / alpha, grid[n], grid[n + 1]
            g = eps_hat
        else:  # flow frame: z = x / (1 + sigma), tau = t
            rho = 1.0 if math.isinf(grid[n]) else alpha * (1 + grid[n])
            z = y / rho
            tau = 1.0 if math.isinf(grid[n]) else grid[n] / (1 + grid[n])
            tau1 = grid[n + 1] / (1 + grid[n + 1])
            g = (z - x0_hat) / tau
        derivs.insert(0, g)
        k = min(order, len(derivs))
        z = z + (tau1 - tau) * sum(c * d for c, d in zip(AB[k], derivs, strict=False))
        rho1 = alpha1 if frame == "ve" else alpha1 * (1 + grid[n + 1])
        y = rho1 * z
    return y
