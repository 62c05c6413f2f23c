"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser: ``raw = u + g (c - u)`` on the network's
output (noise, v or velocity prediction, as diffusers' pipelines combine it), with ``u`` / ``c`` the outputs
under the unconditional and conditional inputs, ``g`` a float or one scale per sample, and optional
guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 16).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from indis.engine.core.conditions import Cond, check_batch, concat, expand, flatten
from indis.engine.core.families import Denoiser


def batch_uncond(cond: Cond, uncond: Cond, batch: int, device: torch.device) -> dict:
    """``uncond`` checked against ``cond`` (the same inputs, a batch of ``batch`` or 1 on ``device``) and
    expanded to ``batch`` rows."""
    if list(flatten(cond)) != list(flatten(uncond)):
        raise ValueError(f"cond has {sorted(flatten(cond))}, uncond {sorted(flatten(uncond))}: give the same "
                         f"inputs")
    check_batch(uncond, batch, device, "uncond", broadcast=True)
    return expand(uncond, batch)


def guided_raw(den: Denoiser, x: Tensor, t: Tensor, cond: Cond, uncond: Cond, scale: float | Tensor,
               rescale: float = 0.0, batched: bool = True) -> Tensor:
    """The guided raw output at ``x`` (``[B, ...]``): ``den.raw`` under ``cond`` and ``uncond`` (same
    inputs; an uncond leaf of batch size 1 is shared by the batch), combined with ``scale`` (a float or
    ``[B]``) and ``rescale``. ``batched``: one call on ``[uncond; cond]``, else two calls."""
    return combine_guided(den, x, t, cond, batch_uncond(cond, uncond, x.shape[0], x.device), scale, rescale,
                          batched)


def combine_guided(den: Denoiser, x: Tensor, t: Tensor, cond: Cond, uncond: Cond, scale: float | Tensor,
                   rescale: float = 0.0, batched: bool = True) -> Tensor:
    """:func:`guided_raw` for an ``uncond`` already in the batch's rows (:func:`batch_uncond`): the network
    call(s) and the combination, no checks."""
    b = x.shape[0]
    if batched:
        u, c = den.raw(torch.cat([x, x]), torch.cat([t, t]), **concat([uncond, cond])).chunk(2)
    else:
        u, c = den.raw(x, t, **uncond), den.raw(x, t, **cond)
    g = scale
    if isinstance(g, Tensor):
        if g.numel() not in (1, b):
            raise ValueError(f"guidance_scale has {g.numel()} values for a batch of {b}")
        g = g.to(x.device, x.dtype).view((-1,) + (1,) * (x.ndim - 1))
    out = u + g * (c - u)
    if rescale:
        dims = tuple(range(1, x.ndim))
        rescaled = out * (c.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
        out = rescale * rescaled + (1 - rescale) * out
    return out


class _GuidedNet(nn.Module):
    def __init__(self, den: Denoiser, uncond: Cond, scale: float | Tensor, rescale: float,
                 batched: bool) -> None:
        super().__init__()
        self.den, self.uncond, self.scale, self.rescale, self.batched = den, uncond, scale, rescale, batched
        self._batched_uncond: tuple[tuple, dict] | None = None

    def forward(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        # the check and expansion of uncond are made once per batch size and set of inputs, not every stage
        key = (x.shape[0], x.device, tuple(flatten(cond)))
        if self._batched_uncond is None or self._batched_uncond[0] != key:
            self._batched_uncond = (key, batch_uncond(cond, self.uncond, x.shape[0], x.device))
        return combine_guided(self.den, x, t, cond, self._batched_uncond[1], self.scale, self.rescale,
                              self.batched)


def check_guidance(uncond: object, guidance_scale: object, guidance_rescale: float) -> None:
    """``ValueError`` unless ``uncond`` is a non-empty dict of tensors, ``guidance_scale`` a finite float
    or ``[B]`` tensor and ``guidance_rescale`` in [0, 1] (reads a tensor scale's values)."""
    if not isinstance(uncond, Mapping) or not flatten(uncond, "uncond"):
        raise ValueError("uncond must be a non-empty dict of the unconditional inputs")
    if isinstance(guidance_scale, Tensor):
        if guidance_scale.ndim > 1 or not bool(torch.isfinite(guidance_scale).all()):
            raise ValueError("guidance_scale must be a float or a finite [B] (or 0-dim) tensor")
    elif not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or \
            not torch.isfinite(torch.tensor(float(guidance_scale))):
        raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite float or a [B] tensor")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale={guidance_rescale!r} must lie in [0, 1]")


def guided_unchecked(den: Denoiser, uncond: Cond, guidance_scale: float | Tensor, guidance_rescale: float,
                     batched: bool) -> Denoiser:
    """:func:`guided` without its checks (no host sync: usable inside a CUDA graph capture)."""
    net = _GuidedNet(den, uncond, guidance_scale, float(guidance_rescale), batched)
    return Denoiser(net, den.family, den.prediction, den.time_input, den.time_scale)


def guided(den: Denoiser, uncond: Cond, guidance_scale: float | Tensor, *, guidance_rescale: float = 0.0,
           batched: bool = True) -> Denoiser:
    """``den`` under classifier-free guidance: called with ``cond`` it returns the guided output, ``uncond``
    (same inputs and shapes; batch size 1 is shared by any batch) being the unconditional inputs (e.g. the
    negative prompt's embeddings). ``guidance_scale``: a float or a ``[B]`` tensor (per-sample guidance);
    ``batched``: one network call on the doubled batch (default) or two calls (half the activation memory).

    Tuning with guidance: pass the guided denoiser as the model (with a float scale and a batch-1 ``uncond``),
    and teacher and student sample with the same guidance; :func:`guidance_key` enters the teacher cache's
    key."""
    check_guidance(uncond, guidance_scale, guidance_rescale)
    return guided_unchecked(den, dict(uncond), guidance_scale, guidance_rescale, batched)


def guidance_key(model: object) -> dict | None:
    """What a guided denoiser's guidance is (scale, rescale, a digest of the unconditional inputs) for a
    cache key, or None for a model without guidance."""
    net = getattr(model, "net", None)
    if not isinstance(net, _GuidedNet):
        return None
    digest = hashlib.sha256()
    for path, v in flatten(net.uncond).items():
        digest.update(f"{path}{tuple(v.shape)}{v.dtype}".encode())
        digest.update(v.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    scale = net.scale.tolist() if isinstance(net.scale, Tensor) else float(net.scale)
    return {"scale": scale, "rescale": net.rescale, "uncond": digest.hexdigest()[:16],
            "inner": guidance_key(net.den)}


__all__ = ["batch_uncond", "check_guidance", "combine_guided", "guidance_key", "guided", "guided_raw",
           "guided_unchecked"]
