"""Noise families and the common denoiser convention.

Every family writes a noisy sample in its own coordinate as ``x_fam = alpha * (x0 + sigma * eps)``, where
``sigma`` is the variance-exploding (VE/EDM, k-diffusion) noise level shared by all families and
``alpha`` is the family's state scale. So ``s = alpha * sigma`` is the noise scale of ``x_fam`` and the
half log-SNR is ``lambda = log(alpha / s) = -log(sigma)`` in every family.

========================  ===============================  ==================  ==========================
family                    time t                           sigma(t)            alpha(sigma)
========================  ===============================  ==================  ==========================
``VE`` (EDM)              t = sigma                        t                   1
``VP`` linear / cosine    continuous t in (0, 1]           sqrt(1/abar - 1)    1 / sqrt(1 + sigma^2)
``VP`` discrete           index into ``alphas_cumprod``    log-linear interp   1 / sqrt(1 + sigma^2)
``Flow`` (rectified)      x_t = (1 - t) x0 + t eps         t / (1 - t)         1 / (1 + sigma)
========================  ===============================  ==================  ==========================

A flow model starts at t = 1, i.e. sigma = inf: its state ``x_t`` stays finite there (alpha = 0, s = 1),
which is why the engine keeps the sampler state in the family's own coordinate and
the solver tables absorb the change of variables. All functions are vectorised over tensors of any shape
and keep ``inf`` / ``0`` endpoints exact.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

Prediction = Literal["x0", "eps", "v", "velocity"]
TimeInput = Literal["sigma", "t"]


def is_plain_value(v: object) -> bool:
    """A value that is its own cache key: None, a number, a string, or a tuple of them."""
    if isinstance(v, tuple):
        return all(is_plain_value(e) for e in v)
    return v is None or isinstance(v, (bool, int, float, str))


class NoiseFamily:
    """Base class: sigma(t) and its inverse, plus the state scale alpha and noise scale s of a sigma."""

    name: str = "base"
    #: Largest and smallest sigma the family can represent (inclusive); inf means t = 1 is allowed.
    sigma_range: tuple[float, float] = (0.0, math.inf)

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def t(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha(self, sigma: Tensor) -> Tensor:
        """State scale: ``x_fam = alpha * x_ve``."""
        raise NotImplementedError

    def s(self, sigma: Tensor) -> Tensor:
        """Noise scale of the state, ``alpha * sigma`` (finite at sigma = inf for VP and flow)."""
        raise NotImplementedError

    def lam(self, sigma: Tensor) -> Tensor:
        """Half log-SNR ``lambda = -log(sigma)`` (+inf at sigma = 0, -inf at sigma = inf)."""
        return -torch.log(sigma)

    def sigma_from_lam(self, lam: Tensor) -> Tensor:
        return torch.exp(-lam)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def key(self) -> tuple | None:
        """What identifies this family's maps by value -- its class and parameters (a tensor parameter by a
        digest of its bytes; attributes named ``_...`` are caches derived from them and left out) -- for
        caches keyed by value; None when a parameter is not a plain number, string, tuple of them or tensor
        (then it cannot be keyed, and is not cached)."""
        items = []
        for name, v in sorted(vars(self).items()):
            if name.startswith("_"):
                continue
            if isinstance(v, Tensor):
                v = (v.dtype, tuple(v.shape), hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes())
                     .hexdigest())
            elif not is_plain_value(v):
                return None
            items.append((name, v))
        return (type(self), tuple(items))


class VE(NoiseFamily):
    """Variance exploding / EDM (Karras et al. 2022): ``x = x0 + sigma * eps``, t = sigma."""

    name = "ve"
    sigma_range = (0.0, math.inf)

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def t(self, sigma: Tensor) -> Tensor:
        return sigma

    def alpha(self, sigma: Tensor) -> Tensor:
        return torch.ones_like(sigma)

    def s(self, sigma: Tensor) -> Tensor:
        return sigma


class _VPScale(NoiseFamily):
    """Shared VP state scale: ``alpha^2 + s^2 = 1``."""

    def alpha(self, sigma: Tensor) -> Tensor:
        return torch.rsqrt(1.0 + sigma * sigma)

    def s(self, sigma: Tensor) -> Tensor:
        return torch.rsqrt(1.0 + torch.reciprocal(sigma * sigma))


class VPLinear(_VPScale):
    """VP-SDE with linear beta (Song et al. 2021): ``abar(t) = exp(-beta_d t^2 / 2 - beta_min t)``."""

    name = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_d: float = 19.9, t_min: float = 1e-5) -> None:
        self.beta_min, self.beta_d = beta_min, beta_d
        self.sigma_range = (float(self.sigma(torch.tensor(t_min, dtype=torch.float64))),
                            float(self.sigma(torch.tensor(1.0, dtype=torch.float64))))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(torch.expm1(0.5 * self.beta_d * t * t + self.beta_min * t))

    def t(self, sigma: Tensor) -> Tensor:
        log1p_s2 = torch.log1p(sigma * sigma)
        return (torch.sqrt(self.beta_min**2 + 2.0 * self.beta_d * log1p_s2) - self.beta_min) / self.beta_d

    def __repr__(self) -> str:
        return f"VPLinear(beta_min={self.beta_min}, beta_d={self.beta_d})"


class VPCosine(_VPScale):
    """Cosine schedule (Nichol & Dhariwal 2021) in continuous time, ``abar(t) = f(t)/f(0)``."""

    name = "vp_cosine"

    def __init__(self, s_offset: float = 0.008, t_max: float = 0.9946) -> None:
        self.s_offset = s_offset
        self._c0 = math.cos(s_offset / (1 + s_offset) * math.pi / 2)
        self.sigma_range = (0.0, float(self.sigma(torch.tensor(t_max, dtype=torch.float64))))

    def sigma(self, t: Tensor) -> Tensor:
        c = torch.cos((t + self.s_offset) / (1 + self.s_offset) * math.pi / 2) / self._c0
        return torch.sqrt(torch.clamp(1.0 / (c * c) - 1.0, min=0.0))

    def t(self, sigma: Tensor) -> Tensor:
        c = self._c0 * self.alpha(sigma)  # cos(...) = c0 * sqrt(abar)
        return torch.acos(c) * 2 / math.pi * (1 + self.s_offset) - self.s_offset

    def __repr__(self) -> str:
        return f"VPCosine(s_offset={self.s_offset})"


class VPDiscrete(_VPScale):
    """Discrete-time VP as diffusers configures it: ``alphas_cumprod[T]`` with t an index in [0, T-1].

    Between integer timesteps, t and sigma are related by linear interpolation of log(sigma) in t (the same
    rule as diffusers' ``_sigma_to_t``), so fractional timesteps are allowed and the map is invertible.
    """

    name = "vp_discrete"

    def __init__(self, alphas_cumprod: Tensor) -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ac.ndim != 1 or ac.numel() < 2 or not bool(torch.all(ac[1:] < ac[:-1])):
            raise ValueError("alphas_cumprod must be a 1-D, strictly decreasing tensor with >= 2 entries")
        self.alphas_cumprod = ac
        self.log_sigmas = 0.5 * torch.log((1 - ac) / ac)
        self.sigma_range = (float(self.log_sigmas[0].exp()), float(self.log_sigmas[-1].exp()))
        self._on_device: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_config(cls, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                    beta_end: float = 0.02, beta_schedule: str = "linear") -> VPDiscrete:
        """``alphas_cumprod`` from a diffusers config (linear, scaled_linear, squaredcos_cap_v2 betas)."""
        n = num_train_timesteps
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            def abar(u: float) -> float:
                return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)],
                                 dtype=torch.float64)
        else:
            raise ValueError(f"beta_schedule={beta_schedule!r} is not one of linear, scaled_linear, "
                             "squaredcos_cap_v2")
        # diffusers builds betas and accumulates in float32; do the same so its tables match bit for bit.
        return cls(torch.cumprod(1.0 - betas.float(), dim=0).double())

    def __getstate__(self) -> dict:
        """Pickled without the per-device cache (its tensors may live on a device the reader lacks)."""
        return {k: v for k, v in vars(self).items() if k != "_on_device"}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self._on_device = {}

    def _knots(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(the integer timesteps, log sigma at each) on ``like``'s device in its dtype, converted once per
        device and dtype: a conversion per call would be a host-to-device copy, which a CUDA graph capture
        refuses. Only real tensors are kept: an export or compiler trace (fake tensors) converts anew."""
        key = (like.device, like.dtype)
        knots = self._on_device.get(key)
        if knots is None:
            steps = torch.arange(self.log_sigmas.numel(), dtype=torch.float64)
            knots = (steps.to(like.device, like.dtype), self.log_sigmas.to(like.device, like.dtype))
            if type(like) is Tensor and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
                self._on_device[key] = knots
        return knots

    @staticmethod
    def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
        """Piecewise-linear ``fp(x)`` over ascending ``xp`` (extended linearly past the ends). The segment is
        found by counting the knots at or below x -- a comparison and a sum, which ONNX exports (opset 19 has
        no searchsorted) -- equal to ``searchsorted(xp, x, right=True)``."""
        idx = torch.clamp((xp <= x.unsqueeze(-1)).sum(-1) - 1, 0, xp.numel() - 2)
        w = (x - xp[idx]) / (xp[idx + 1] - xp[idx])
        return fp[idx] + w * (fp[idx + 1] - fp[idx])

    def sigma(self, t: Tensor) -> Tensor:
        steps, log_sigmas = self._knots(t)
        return torch.exp(self._interp(t, steps, log_sigmas))

    def t(self, sigma: Tensor) -> Tensor:
        steps, log_sigmas = self._knots(sigma)
        return self._interp(torch.log(sigma), log_sigmas, steps)

    def __repr__(self) -> str:
        return f"VPDiscrete(T={self.alphas_cumprod.numel()})"


class Flow(NoiseFamily):
    """Rectified flow / flow matching: ``x_t = (1 - t) x0 + t eps``, so sigma = t / (1 - t)."""

    name = "flow"
    sigma_range = (0.0, math.inf)

    def sigma(self, t: Tensor) -> Tensor:
        return t / (1.0 - t)

    def t(self, sigma: Tensor) -> Tensor:
        return torch.reciprocal(1.0 + torch.reciprocal(sigma))

    def alpha(self, sigma: Tensor) -> Tensor:
        return torch.reciprocal(1.0 + sigma)

    def s(self, sigma: Tensor) -> Tensor:
        return torch.reciprocal(1.0 + torch.reciprocal(sigma))


FAMILIES: dict[str, Callable[[], NoiseFamily]] = {
    "ve": VE, "edm": VE, "vp_linear": VPLinear, "vp_cosine": VPCosine, "flow": Flow,
}


def get_family(family: NoiseFamily | str) -> NoiseFamily:
    """A family instance from an instance or a name (ve/edm, vp_linear, vp_cosine, flow)."""
    if isinstance(family, NoiseFamily):
        return family
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is unknown; use one of {sorted(FAMILIES)} or a NoiseFamily "
                         "(VPDiscrete(alphas_cumprod) for diffusers configs)")
    return FAMILIES[family]()


def raw_to_x0(prediction: Prediction, family: NoiseFamily, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Coefficients (a, b) with ``x0 = a * x_fam + b * raw`` for a model predicting ``prediction``.

    eps: x0 = (x - s eps) / alpha;  x0: identity;  v (VP, Salimans & Ho 2022): x0 = alpha x - s v;
    velocity (flow matching, v = eps - x0): x0 = x - s v. ``sigma`` broadcasts.
    """
    alpha, s = family.alpha(sigma), family.s(sigma)
    if prediction == "x0":
        return torch.zeros_like(sigma), torch.ones_like(sigma)
    if prediction == "eps":
        return torch.reciprocal(alpha), -s / alpha
    if prediction == "v":
        if not isinstance(family, _VPScale):
            raise ValueError(f"prediction='v' needs a VP family (alpha^2 + s^2 = 1), got {family!r}")
        return alpha, -s
    if prediction == "velocity":
        if not isinstance(family, Flow):
            raise ValueError(f"prediction='velocity' needs the Flow family, got {family!r}")
        return torch.ones_like(sigma), -s
    raise ValueError(f"prediction={prediction!r} is not one of 'x0', 'eps', 'v', 'velocity'")


class Denoiser(torch.nn.Module):
    """A network of some family turned into the common denoiser ``model(x, sigma[B], **cond) -> x0``.

    ``net(x_fam, time[B], **cond) -> raw`` is called in the family's own coordinate with ``time`` =
    ``time_scale * family.t(sigma)`` (``time_input="t"``, e.g. diffusers' discrete VP index or a flow
    model's ``1000 t``) or ``sigma`` itself (``time_input="sigma"``). ``forward`` follows k-diffusion
    (VE ``x``); the samplers call :meth:`raw` on the state directly so that a flow model can start at
    t = 1 (sigma = inf) where the VE ``x`` is infinite.
    """

    def __init__(self, net: Callable[..., Tensor], family: NoiseFamily | str = "ve",
                 prediction: Prediction = "x0", time_input: TimeInput = "sigma",
                 time_scale: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.family = get_family(family)
        if prediction not in ("x0", "eps", "v", "velocity"):
            raise ValueError(f"prediction={prediction!r} is not one of 'x0', 'eps', 'v', 'velocity'")
        raw_to_x0(prediction, self.family, torch.ones(1, dtype=torch.float64))  # validates the pairing
        if time_input not in ("sigma", "t"):
            raise ValueError(f"time_input={time_input!r} is not 'sigma' or 't'")
        self.prediction, self.time_input, self.time_scale = prediction, time_input, float(time_scale)

    def time(self, sigma: Tensor) -> Tensor:
        """The time value the network receives for noise level ``sigma``."""
        return sigma if self.time_input == "sigma" else self.time_scale * self.family.t(sigma)

    def raw(self, x_fam: Tensor, time: Tensor, **cond) -> Tensor:
        """The network's output at ``x_fam``; one of another shape is refused (it would broadcast)."""
        out = self.net(x_fam, time, **cond)
        if not isinstance(out, Tensor) or out.shape != x_fam.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the model returned {got} for an input of shape {tuple(x_fam.shape)}; "
                             "it must return one output per sample, of the input's shape")
        return out

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        view = (-1,) + (1,) * (x.ndim - 1)
        alpha = self.family.alpha(sigma).view(view)
        a, b = raw_to_x0(self.prediction, self.family, sigma)
        x_fam = (alpha * x).to(x.dtype)
        raw = self.raw(x_fam, self.time(sigma).to(x.dtype), **cond)
        return (a.view(view) * x_fam + b.view(view) * raw).to(x.dtype)


def as_denoiser(model: Callable[..., Tensor] | Denoiser) -> Denoiser:
    """Treat a plain callable as a k-diffusion denoiser (VE family, x0 prediction, sigma input)."""
    return model if isinstance(model, Denoiser) else Denoiser(model, "ve", "x0", "sigma")
