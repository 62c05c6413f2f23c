"""Discretizations: heuristic grids, AYS tables, user formats, and the LD3/INDIS monotone parameterisation.

Every grid here is a descending tensor of VE noise levels (``sigma``, k-diffusion convention; any family
converts with ``family.t``/``family.sigma``). ``get_sigmas`` returns ``[N+1]`` points for N steps;
``as_grid`` turns any accepted format into the one internal type ``[B, N+1]`` (a shared grid is a broadcast
view, so it costs nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from indis.engine.core.families import NoiseFamily, get_family

HEURISTICS = ("edm", "logsnr", "uniform_t", "time_quadratic", "ays")
Space = Literal["lambda", "t", "sigma"]
MIN_GAP = 1e-4  # share of the mapped axis that grid_from_logits spreads evenly over the steps

#: Align Your Steps (Sabour et al. 2024) 10-step tables, as published with the paper and shipped in
#: diffusers' ``AysSchedules``; other step counts interpolate log-linearly (the paper's rule).
AYS_TABLES: dict[str, tuple[float, ...]] = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}


def _check_range(nfe: int, sigma_min: float, sigma_max: float) -> None:
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive int, got {nfe!r}")
    if not (0 < sigma_min < sigma_max) or math.isnan(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def _to_space(sigma: Tensor, space: Space, family: NoiseFamily) -> Tensor:
    if space == "lambda":
        return -torch.log(sigma)
    if space == "t":
        return family.t(sigma)
    if space == "sigma":
        return sigma
    raise ValueError(f"space={space!r} is not one of 'lambda', 't', 'sigma'")


def _from_space(u: Tensor, space: Space, family: NoiseFamily) -> Tensor:
    if space == "lambda":
        return torch.exp(-u)
    if space == "t":
        return family.sigma(u)
    return u


def get_sigmas(kind: str, nfe: int, sigma_min: float, sigma_max: float, *, rho: float = 7.0,
               family: NoiseFamily | str = "ve", table: str | Sequence[float] = "sd15",
               final_zero: bool = False, dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> Tensor:
    """Heuristic grid of ``nfe + 1`` descending sigmas from ``sigma_max`` to ``sigma_min``.

    kinds: ``edm`` (Karras et al. 2022 polynomial, exponent ``rho``), ``logsnr`` (uniform in lambda),
    ``uniform_t`` / ``time_quadratic`` (uniform / quadratic in the ``family``'s time t, DPM-Solver's
    rules; t = sigma for VE), ``ays`` (an Align-Your-Steps ``table`` -- a name in ``AYS_TABLES`` or a
    descending list -- interpolated log-linearly to ``nfe + 1`` points, then stretched affinely in log sigma
    onto [sigma_min, sigma_max]; pass the table's own endpoints to get it verbatim).
    ``final_zero=True`` makes the last point 0 (diffusers/k-diffusion style): the grid then has ``nfe``
    positive points plus 0, so one-evaluation-per-step solvers still spend exactly ``nfe`` evaluations.
    """
    fam = get_family(family)
    _check_range(nfe, sigma_min, sigma_max)
    n_pos = nfe if final_zero else nfe + 1
    if n_pos < 2:
        raise ValueError("final_zero=True needs nfe >= 2 (one positive step plus the step to 0)")
    u = torch.linspace(0.0, 1.0, n_pos, dtype=torch.float64)
    smin, smax = torch.tensor(sigma_min, dtype=torch.float64), torch.tensor(sigma_max, dtype=torch.float64)
    if math.isinf(sigma_max) and not (kind in ("uniform_t", "time_quadratic") and math.isfinite(fam.t(smax))):
        raise ValueError(f"sigma_max=inf: kind={kind!r} cannot start there; only a family whose time is "
                         f"finite at sigma = inf (flow: t = 1) can, with uniform_t or time_quadratic")
    if kind == "edm":
        if not 0 < rho < math.inf:
            raise ValueError(f"rho={rho} must be positive and finite")
        a, b = smax ** (1 / rho), smin ** (1 / rho)
        sigmas = (a + u * (b - a)) ** rho
    elif kind == "logsnr":
        sigmas = torch.exp(torch.log(smax) + u * (torch.log(smin) - torch.log(smax)))
    elif kind in ("uniform_t", "time_quadratic"):
        p = 1.0 if kind == "uniform_t" else 2.0
        a, b = fam.t(smax) ** (1 / p), fam.t(smin) ** (1 / p)
        sigmas = fam.sigma((a + u * (b - a)) ** p)
    elif kind == "ays":
        tab = torch.tensor(AYS_TABLES[table] if isinstance(table, str) else table, dtype=torch.float64)
        if tab.ndim != 1 or tab.numel() < 2 or not bool(torch.all(tab[1:] < tab[:-1])) or tab[-1] <= 0:
            raise ValueError("table must be a descending list of >= 2 positive sigmas")
        log_tab = torch.log(tab)
        pos = u * (tab.numel() - 1)
        lo = torch.clamp(pos.floor().long(), max=tab.numel() - 2)
        interp = log_tab[lo] + (pos - lo) * (log_tab[lo + 1] - log_tab[lo])
        shape = (interp - log_tab[0]) / (log_tab[-1] - log_tab[0])  # 0 -> 1
        sigmas = torch.exp(torch.log(smax) + shape * (torch.log(smin) - torch.log(smax)))
    else:
        raise ValueError(f"kind={kind!r} is not one of {HEURISTICS}")
    sigmas[0], sigmas[-1] = smax, smin  # exact endpoints despite pow/exp rounding
    if torch.isnan(sigmas).any():
        raise ValueError(f"kind={kind!r} gives no grid between sigma_min={sigma_min} and "
                         f"sigma_max={sigma_max} for this family")
    if final_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(device=device, dtype=dtype)


def as_grid(sigmas: Tensor | Sequence[float] | None = None, *, batch_size: int | None = None,
            timesteps: Tensor | Sequence[float] | None = None, family: NoiseFamily | str = "ve",
            dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """Normalise a user grid to the internal ``[B, N+1]`` descending-sigma type (no copy when shared).

    Accepts k-diffusion-style descending sigma tensors (a trailing 0 allowed), diffusers-style
    ``sigmas=`` lists, or ``timesteps=`` in the ``family``'s time (converted with ``family.sigma``;
    e.g. flow t in [0, 1], or diffusers' discrete VP indices for ``VPDiscrete``). ``[N+1]`` input is
    broadcast to ``batch_size`` rows. Values are validated by the sampler (``check_grid``).
    """
    if (sigmas is None) == (timesteps is None):
        raise ValueError("pass exactly one of sigmas= or timesteps=")
    if timesteps is not None:
        t = torch.as_tensor(timesteps, dtype=torch.float64, device=device)
        grid = get_family(family).sigma(t)
    else:
        grid = torch.as_tensor(sigmas, device=device)
        if not grid.is_floating_point():
            grid = grid.to(torch.float64)
    grid = grid.to(dtype=dtype)
    if grid.ndim == 1:
        grid = grid.unsqueeze(0)
        if batch_size is not None:
            grid = grid.expand(batch_size, -1)
    elif grid.ndim != 2:
        raise ValueError(f"sigmas must have shape [N+1] or [B, N+1], got {tuple(grid.shape)}")
    elif batch_size is not None and grid.shape[0] != batch_size:
        if grid.shape[0] != 1:
            raise ValueError(f"sigmas has {grid.shape[0]} rows but the batch has {batch_size} samples")
        grid = grid.expand(batch_size, -1)
    if grid.shape[-1] < 2:
        raise ValueError(f"sigmas needs at least 2 points (one step), got {grid.shape[-1]}")
    return grid


def grid_from_logits(logits: Tensor, sigma_min: float | Tensor, sigma_max: float | Tensor,
                     space: Space = "lambda", family: NoiseFamily | str = "ve") -> Tensor:
    """LD3/INDIS monotone grid: logits ``[..., N+1]`` -> softmax -> cumsum -> min-max -> map into ``space``.

    The result ``[..., N+1]`` descends strictly from ``sigma_max`` to ``sigma_min`` (endpoints exact for
    any logits; every step spans at least ``MIN_GAP / N`` of the mapped axis, so saturated logits cannot
    merge points), and is differentiable in the logits. The first logit is redundant (LD3's N+1 form).
    ``space`` picks the axis the normalised positions are laid out on: ``lambda`` (log sigma), ``t`` (the
    family's time) or ``sigma``.
    """
    fam = get_family(family)
    p = torch.softmax(logits[..., 1:], dim=-1)  # logits[..., 0] only ever cancels in the min-max step
    p = (1 - MIN_GAP) * p + MIN_GAP / p.shape[-1]  # every gap >= MIN_GAP / N: strict for any logits
    c = torch.cat([torch.zeros_like(p[..., :1]), torch.cumsum(p, dim=-1)], dim=-1)
    c = c / c[..., -1:]
    # A Python number is filled on the device (no host-to-device copy: safe inside a CUDA graph).
    smin, smax = (v.to(logits) if isinstance(v, Tensor)
                  else torch.full((), float(v), dtype=logits.dtype, device=logits.device)
                  for v in (sigma_min, sigma_max))
    smin, smax = (v.unsqueeze(-1) if v.ndim else v for v in (smin, smax))  # broadcast over grid points
    u_max, u_min = _to_space(smax, space, fam), _to_space(smin, space, fam)
    sig = _from_space(u_max + c * (u_min - u_max), space, fam)
    first, last = smax.expand_as(sig[..., :1]), smin.expand_as(sig[..., :1])
    return torch.cat([first, sig[..., 1:-1], last], dim=-1)


def logits_from_grid(sigmas: Tensor, space: Space = "lambda", family: NoiseFamily | str = "ve") -> Tensor:
    """Inverse of :func:`grid_from_logits`: logits that reproduce ``sigmas`` exactly (first logit 0)."""
    fam = get_family(family)
    u = _to_space(sigmas, space, fam)
    c = (u - u[..., :1]) / (u[..., -1:] - u[..., :1])
    inc = torch.diff(c, dim=-1)
    if not bool(torch.all(inc > MIN_GAP / inc.shape[-1])):
        raise ValueError("sigmas must be strictly descending, with every step at least MIN_GAP / N of the "
                         "mapped axis, to be represented by logits")
    p = (inc - MIN_GAP / inc.shape[-1]) / (1 - MIN_GAP)
    return torch.cat([torch.zeros_like(c[..., :1]), torch.log(p)], dim=-1)


@dataclass(frozen=True)
class Schedule:
    """A per-sample INDIS schedule: ``grid`` ``[B, N+1]`` (or shared ``[N+1]``) descending sigmas, the
    evaluation ``shift`` ``[B, N]`` (log-sigma units: the network sees ``sigma_n * exp(shift_n)``) and the
    output ``scale`` ``[B, N]`` (multiplies that call's noise prediction; ``indis.engine.core.solvers``
    defines the corrected call). ``indis.sample`` accepts it as ``sigmas``."""

    grid: Tensor
    shift: Tensor | None = None
    scale: Tensor | None = None

    def detach(self) -> Schedule:
        """The same schedule without autograd history (for sampling after tuning)."""
        return Schedule(*(None if v is None else v.detach() for v in (self.grid, self.shift, self.scale)))
