"""Independent float64 re-implementation of k-diffusion's deterministic samplers (test oracle only).

Written from the algorithms' definitions (Karras et al. 2022, Alg. 1/2 with s_churn = 0; DPM-Solver++
(Lu et al. 2022) in k-diffusion's multistep forms; iPNDM with fixed Adams-Bashforth coefficients, Zhang &
Chen 2023 as in zju-pi/diff-sampler) to mirror k-diffusion's ``k_diffusion/sampling.py`` step for step:
the same k-diffusion signature ``(model, x, sigmas, extra_args=None)``, one shared ``[N+1]`` grid, a
*scalar* sigma per step (``model(x, sigma * ones[B])``), the same branching on ``sigmas[i + 1] == 0`` and
the same order warm-up. Plain Python loops, one short function per sampler, everything in float64.

``model(x, sigma[B], **extra_args) -> denoised`` is a VE (EDM) denoiser, ``x = x0 + sigma * eps``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["get_sigmas_karras", "sample_dpmpp_2m", "sample_dpmpp_3m_sde", "sample_euler", "sample_heun",
           "sample_ipndm"]


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      concat_zero: bool = True) -> Tensor:
    """Karras et al. (2022) grid with ``n`` steps, in float64 (k-diffusion builds it in float32).

    ``concat_zero``: ``n`` noise levels from sigma_max to sigma_min plus a final 0 (k-diffusion's default);
    otherwise ``n + 1`` noise levels from sigma_max to sigma_min (no trailing 0).
    """
    ramp = torch.linspace(0.0, 1.0, n if concat_zero else n + 1, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if concat_zero else sigmas


def _setup(x: Tensor, sigmas: Tensor, extra_args: dict | None) -> tuple[Tensor, Tensor, Tensor, dict]:
    if sigmas.ndim != 1:
        raise ValueError("the reference takes one shared [N+1] grid (run ragged rows one sample at a time)")
    x = x.to(torch.float64)
    return x, sigmas.to(torch.float64), x.new_ones(x.shape[0]), {} if extra_args is None else extra_args


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _deriv(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """Karras ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma."""
    return (x - denoised) / _bcast(sigma, x)


@torch.no_grad()
def sample_euler(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None) -> Tensor:
    """Euler on the probability-flow ODE (Karras Alg. 2 with s_churn = 0, so sigma_hat = sigma_i)."""
    x, sigmas, ones, extra = _setup(x, sigmas, extra_args)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = _deriv(x, sigma, model(x, sigma * ones, **extra))
        x = x + (sigma_next - sigma) * d
    return x


@torch.no_grad()
def sample_heun(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None) -> Tensor:
    """Heun's 2nd-order method (Karras Alg. 1, deterministic); a step to sigma = 0 is an Euler step."""
    x, sigmas, ones, extra = _setup(x, sigmas, extra_args)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        dt = sigma_next - sigma
        d = _deriv(x, sigma, model(x, sigma * ones, **extra))
        x_euler = x + dt * d
        if sigma_next == 0:
            x = x_euler
            continue
        d_next = _deriv(x_euler, sigma_next, model(x_euler, sigma_next * ones, **extra))
        x = x + dt * (d + d_next) / 2
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None) -> Tensor:
    """DPM-Solver++(2M), k-diffusion's midpoint form, in lambda = -log(sigma).

    First order (DPM-Solver++(1) = DDIM) on the first step and on a step to sigma = 0; otherwise the
    data prediction is extrapolated as ``D + (D - D_prev) / (2 r)`` with ``r = h_prev / h``.
    """
    x, sigmas, ones, extra = _setup(x, sigmas, extra_args)
    prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * ones, **extra)
        if sigma_next == 0:
            x = denoised  # exp(-h) = 0, -expm1(-h) = 1: the first-order update is exactly D
        else:
            h = torch.log(sigma) - torch.log(sigma_next)  # lambda_next - lambda > 0
            d = denoised if prev is None else denoised + (denoised - prev) * (h / (2 * h_prev))
            x = torch.exp(-h) * x - torch.expm1(-h) * d
            h_prev = h
        prev = denoised
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, eta: float = 0.0,
                        warmup: str = "kdiffusion") -> Tensor:
    """DPM-Solver++(3M) SDE with ``eta = 0`` (then deterministic: it is the 3M ODE solver).

    Order min(i + 1, 3); a step to sigma = 0 returns the data prediction (first order). With ``eta = 0``,
    h_eta = h and the update is ``x' = e^{-h} x + (1 - e^{-h}) D + phi_2 D1 - phi_3 D2`` with
    ``phi_2 = expm1(-h)/h + 1``, ``phi_3 = phi_2/h - 1/2`` (VE: alpha = 1) and D1, D2 the divided
    differences of the last three data predictions in lambda, scaled by h.

    ``warmup`` selects the 2nd-order step used while only one earlier output exists (step 1):
    ``"kdiffusion"`` (faithful): ``+ phi_2 (D - D_1) / r``;  ``"midpoint"`` (diffusers'
    ``solver_type="midpoint"`` 2nd-order update): ``+ (1 - e^{-h}) (D - D_1) / (2 r)``; ``r = h_1 / h``.
    """
    if eta != 0:
        raise NotImplementedError("only the deterministic eta = 0 case is implemented (no noise sampler)")
    if warmup not in ("kdiffusion", "midpoint"):
        raise ValueError(f"warmup={warmup!r} must be 'kdiffusion' or 'midpoint'")
    x, sigmas, ones, extra = _setup(x, sigmas, extra_args)
    outs: list[Tensor] = []   # earlier data predictions, newest first
    hs: list[Tensor] = []     # earlier step sizes in lambda, newest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * ones, **extra)
        if sigma_next == 0:
            x = denoised
        else:
            h = torch.log(sigma) - torch.log(sigma_next)
            x = torch.exp(-h) * x - torch.expm1(-h) * denoised
            phi_2 = torch.expm1(-h) / h + 1
            if len(outs) >= 2:
                r0, r1 = hs[0] / h, hs[1] / h
                d1_0 = (denoised - outs[0]) / r0
                d1_1 = (outs[0] - outs[1]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif len(outs) == 1:
                d = (denoised - outs[0]) / (hs[0] / h)
                x = x + (phi_2 * d if warmup == "kdiffusion" else -torch.expm1(-h) * d / 2)
            hs.insert(0, h)
        outs.insert(0, denoised)
        del outs[2:], hs[2:]
    return x


_AB = {1: (1.0,), 2: (3.0, -1.0), 3: (23.0, -16.0, 5.0), 4: (55.0, -59.0, 37.0, -9.0)}
_AB_DEN = {1: 1.0, 2: 2.0, 3: 12.0, 4: 24.0}


@torch.no_grad()
def sample_ipndm(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                 max_order: int = 4) -> Tensor:
    """iPNDM: Adams-Bashforth in sigma with *fixed* coefficients, warm-up orders 1, 2, 3, 4.

    ``x' = x + (sigma' - sigma) * sum_j c_j d_{i-j} / den`` with (c; den) = (1; 1), (3, -1; 2),
    (23, -16, 5; 12), (55, -59, 37, -9; 24), d = (x - D) / sigma, newest first. As in zju-pi/diff-sampler
    (and the brief), a final step to sigma = 0 is the same AB step, *not* replaced by ``x = D`` (some
    later ComfyUI versions do that replacement).
    """
    x, sigmas, ones, extra = _setup(x, sigmas, extra_args)
    ds: list[Tensor] = []  # derivatives, newest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        ds.insert(0, _deriv(x, sigma, model(x, sigma * ones, **extra)))
        order = min(max_order, i + 1)
        combo = sum(c * d for c, d in zip(_AB[order], ds, strict=False)) / _AB_DEN[order]
        x = x + (sigma_next - sigma) * combo
        del ds[max_order - 1:]
    return x
