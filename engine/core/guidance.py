"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser: ``raw = u + g (c - u)`` on the network's
output (noise, v or velocity prediction, as diffusers' pipelines combine it), with ``u`` / ``c`` the outputs
under the unconditional and conditional inputs, ``g`` a float or one scale per sample, and optional
guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 16).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from indis.engine.core.families import Denoiser


def _cat(a: Any, b: Any, name: str) -> Any:
    """``[a; b]`` along the batch axis, through nested dicts (e.g. SDXL's ``added_cond_kwargs``)."""
    if isinstance(a, Mapping):
        if not isinstance(b, Mapping) or set(a) != set(b):
            raise ValueError(f"cond and uncond must have the same keys at {name!r}")
        return {k: _cat(a[k], b[k], f"{name}.{k}") for k in a}
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"cond and uncond {name!r} must be tensors of the same shape after the batch axis")
    return torch.cat([a, b])


class _GuidedNet(nn.Module):
    def __init__(self, den: Denoiser, uncond: dict, scale: float | Tensor, rescale: float,
                 batched: bool) -> None:
        super().__init__()
        self.den, self.uncond, self.scale, self.rescale, self.batched = den, uncond, scale, rescale, batched

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if set(cond) != set(self.uncond):
            raise ValueError(f"cond has {sorted(cond)}, uncond {sorted(self.uncond)}: give the same inputs")
        if self.batched:  # one network call on [uncond; cond]
            both = {k: _cat(self.uncond[k], v, k) for k, v in cond.items()}
            u, c = self.den.raw(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        else:
            u, c = self.den.raw(x, t, **self.uncond), self.den.raw(x, t, **cond)
        view = (-1,) + (1,) * (x.ndim - 1)
        g = self.scale
        if isinstance(g, Tensor):
            if g.numel() != x.shape[0]:
                raise ValueError(f"guidance_scale has {g.numel()} values for a batch of {x.shape[0]}")
            g = g.to(x.device, x.dtype).view(view)
        out = u + g * (c - u)
        if self.rescale:
            dims = tuple(range(1, x.ndim))
            rescaled = out * (c.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
            out = self.rescale * rescaled + (1 - self.rescale) * out
        return out


def guided(den: Denoiser, uncond: dict, guidance_scale: float | Tensor, *, guidance_rescale: float = 0.0,
           batched: bool = True) -> Denoiser:
    """``den`` under classifier-free guidance: called with ``cond`` it returns the guided output, ``uncond``
    (same keys, same shapes) being the unconditional inputs (e.g. the negative prompt's embeddings).
    ``guidance_scale``: a float or a ``[B]`` tensor (per-sample guidance); ``batched``: one network call on
    the doubled batch (default) or two calls (half the activation memory)."""
    if not isinstance(uncond, Mapping) or not uncond:
        raise ValueError("uncond must be a non-empty dict of the unconditional inputs")
    if isinstance(guidance_scale, Tensor):
        if guidance_scale.ndim != 1 or not bool(torch.isfinite(guidance_scale).all()):
            raise ValueError("guidance_scale must be a float or a finite [B] tensor")
    elif not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or \
            not torch.isfinite(torch.tensor(float(guidance_scale))):
        raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite float or a [B] tensor")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale={guidance_rescale!r} must lie in [0, 1]")
    net = _GuidedNet(den, dict(uncond), guidance_scale, float(guidance_rescale), batched)
    return Denoiser(net, den.family, den.prediction, den.time_input, den.time_scale)
