"""Noise families: sigma(t) and its inverse, state scales at the ends, and the denoiser wrappers."""

from __future__ import annotations

import math

import pytest
import torch

import indis
from indis.engine.core.families import Denoiser, Flow, VPCosine, VPDiscrete, VPLinear, raw_to_x0

FAMILIES = [indis.VE(), VPLinear(), VPCosine(), VPDiscrete.from_config(), Flow()]


@pytest.mark.parametrize("fam", FAMILIES, ids=repr)
def test_sigma_t_roundtrip_and_scales(fam) -> None:
    lo, hi = fam.sigma_range
    sig = torch.exp(torch.linspace(math.log(max(lo, 1e-3)), math.log(min(hi, 1e3)), 50, dtype=torch.float64))
    torch.testing.assert_close(fam.sigma(fam.t(sig)), sig, rtol=1e-9, atol=0)
    alpha, s = fam.alpha(sig), fam.s(sig)
    torch.testing.assert_close(s, alpha * sig)                     # x_fam = alpha (x0 + sigma eps)
    torch.testing.assert_close(fam.lam(sig), torch.log(alpha / s))  # half log-SNR


def test_vp_discrete_matches_diffusers_sigmas() -> None:
    from diffusers import DDPMScheduler

    for schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        ref = DDPMScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012)
        fam = VPDiscrete.from_config(1000, 0.00085, 0.012, schedule)
        sig = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5
        torch.testing.assert_close(fam.sigma(torch.arange(1000, dtype=torch.float64)), sig.double(),
                                   rtol=1e-6, atol=0)


def test_infinite_end_is_finite_in_state_coordinates() -> None:
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for fam in (Flow(), VPLinear()):
        assert fam.alpha(inf).item() == 0.0 and fam.s(inf).item() == 1.0
    assert Flow().t(inf).item() == 1.0 and Flow().sigma(torch.tensor([1.0])).item() == math.inf
    zero = torch.zeros(1, dtype=torch.float64)
    assert Flow().s(zero).item() == 0.0 and VPLinear().s(zero).item() == 0.0


@pytest.mark.parametrize(("fam", "prediction"), [(VPLinear(), "eps"), (VPLinear(), "v"), (VPLinear(), "x0"),
                                                 (Flow(), "velocity"), (Flow(), "eps")])
def test_wrapper_recovers_x0_for_every_prediction(fam, prediction) -> None:
    """A network that predicts the exact target of a known (x0, eps) gives back x0 via the wrapper."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 5.0, 20.0], dtype=torch.float64)
    alpha, s = fam.alpha(sigma).view(-1, 1), fam.s(sigma).view(-1, 1)
    target = {"eps": eps, "x0": x0, "v": alpha * eps - s * x0, "velocity": eps - x0}[prediction]
    den = Denoiser(lambda x, t: target, fam, prediction, "t")
    torch.testing.assert_close(den(x0 + sigma.view(-1, 1) * eps, sigma), x0)
    a, b = raw_to_x0(prediction, fam, sigma)
    x_fam = alpha * x0 + s * eps
    torch.testing.assert_close(a.view(-1, 1) * x_fam + b.view(-1, 1) * target, x0)


def test_invalid_pairings_raise() -> None:
    with pytest.raises(ValueError, match="needs a VP family"):
        Denoiser(lambda x, t: x, Flow(), "v")
    with pytest.raises(ValueError, match="needs the Flow family"):
        Denoiser(lambda x, t: x, VPLinear(), "velocity")
    with pytest.raises(ValueError, match="family='vp'"):
        Denoiser(lambda x, t: x, "vp")
    with pytest.raises(ValueError, match="prediction='noise'"):
        Denoiser(lambda x, t: x, "ve", "noise")


@pytest.mark.parametrize("backend", ["torch", None])
def test_a_model_output_of_another_shape_is_refused_not_broadcast(backend: str | None) -> None:
    """A network returning ``[1, ...]`` for a batch of 4 used to be applied to every row on the torch path."""
    x = torch.randn(4, 6, dtype=torch.float64) * 80
    grid = indis.get_sigmas("edm", 3, 0.002, 80.0)
    for bad in (lambda x, s: x[:1], lambda x, s: x[:, :3], lambda x, s: x.tolist()):
        with pytest.raises(ValueError, match="one output per sample"):
            indis.sample(bad, x, grid, "euler", backend=backend)


def test_vp_discrete_time_map_counts_knots_like_searchsorted() -> None:
    """VPDiscrete finds its segment by counting knots (ONNX has no searchsorted): the same maps as with
    ``torch.searchsorted``, inside the range, past both ends and exactly on knots."""
    fam = VPDiscrete.from_config(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    knots = torch.arange(1000, dtype=torch.float64)
    t = torch.cat([torch.rand(64, dtype=torch.float64) * 1010 - 5, knots[::97], torch.tensor([0.0, 999.0])])

    def reference(x, xp, fp):
        idx = torch.clamp(torch.searchsorted(xp, x, right=True) - 1, 0, xp.numel() - 2)
        return fp[idx] + (x - xp[idx]) / (xp[idx + 1] - xp[idx]) * (fp[idx + 1] - fp[idx])

    torch.testing.assert_close(fam.sigma(t), torch.exp(reference(t, knots, fam.log_sigmas)), rtol=0, atol=0)
    sigma = torch.exp(torch.linspace(-4, 3, 50, dtype=torch.float64))
    torch.testing.assert_close(fam.t(sigma), reference(torch.log(sigma), fam.log_sigmas, knots), rtol=0,
                               atol=0)


def test_vp_discrete_converts_its_knots_once_per_device_and_dtype() -> None:
    """VPDiscrete's maps convert their knots once per device and dtype and then only compute: on CUDA a
    conversion per call would be a host-to-device copy, which a graph capture refuses. The family's value
    key ignores that cache (a plan cache keyed by the family still hits)."""
    from torch.overrides import TorchFunctionMode

    class Conversions(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.count += func in (torch.Tensor.to, torch.Tensor.double, torch.Tensor.float)
            return func(*args, **(kwargs or {}))

    fam = VPDiscrete.from_config()
    key = fam.key()
    for dtype in (torch.float64, torch.float32):
        sigma = torch.tensor([0.5, 3.0], dtype=dtype)
        first = fam.t(sigma)
        with Conversions() as seen:
            again, back = fam.t(sigma), fam.sigma(first)
        assert seen.count == 0 and torch.equal(again, first) and back.dtype == dtype
    assert key is not None and fam.key() == key
    import pickle

    back = pickle.loads(pickle.dumps(fam))  # without the cache, which fills again on use
    assert not back._on_device and torch.equal(back.t(sigma), fam.t(sigma)) and back.key() == key
