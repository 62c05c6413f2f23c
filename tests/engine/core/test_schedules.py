"""Heuristic grids, AYS interpolation, user formats and the LD3/INDIS monotone parameterisation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import indis
from indis.engine.core.families import Flow, VPLinear


@pytest.mark.parametrize("kind", ["edm", "logsnr", "uniform_t", "time_quadratic", "ays"])
@pytest.mark.parametrize("final_zero", [False, True])
def test_heuristics_are_descending_with_exact_endpoints(kind: str, final_zero: bool) -> None:
    sig = indis.get_sigmas(kind, 7, 0.002, 80.0, final_zero=final_zero)
    assert sig.shape == (8,)
    assert sig[0] == 80.0
    assert sig[-1] == (0.0 if final_zero else 0.002)
    assert (torch.diff(sig) < 0).all()


def test_heuristic_formulas() -> None:
    n, lo, hi = 5, 0.002, 80.0
    i = torch.arange(n + 1, dtype=torch.float64) / n
    edm = (hi ** (1 / 7) + i * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    torch.testing.assert_close(indis.get_sigmas("edm", n, lo, hi), edm)
    lam = torch.log(torch.tensor(hi)) + i * (torch.log(torch.tensor(lo)) - torch.log(torch.tensor(hi)))
    torch.testing.assert_close(indis.get_sigmas("logsnr", n, lo, hi), torch.exp(lam.double()))
    torch.testing.assert_close(indis.get_sigmas("uniform_t", n, lo, hi), hi + i * (lo - hi))
    quad = (hi**0.5 + i * (lo**0.5 - hi**0.5)) ** 2
    torch.testing.assert_close(indis.get_sigmas("time_quadratic", n, lo, hi), quad)
    # Family time: uniform in the VP-linear t.
    fam = VPLinear()
    t = fam.t(indis.get_sigmas("uniform_t", n, 0.01, 100.0, family=fam))
    torch.testing.assert_close(torch.diff(t), torch.full((n,), float(torch.diff(t)[0]), dtype=torch.float64))


def test_ays_tables_match_diffusers_and_interpolate_log_linearly() -> None:
    from diffusers.schedulers import AysSchedules

    for name, key in (("sd15", "StableDiffusionSigmas"), ("sdxl", "StableDiffusionXLSigmas"),
                      ("svd", "StableDiffusionVideoSigmas")):
        # diffusers replaces the paper's last entry (the model's sigma_min) with 0.
        assert list(indis.AYS_TABLES[name][:-1]) == pytest.approx(AysSchedules[key][:-1])
        tab = indis.AYS_TABLES[name]
        verbatim = indis.get_sigmas("ays", 10, tab[-1], tab[0], table=name)
        torch.testing.assert_close(verbatim, torch.tensor(tab, dtype=torch.float64))
    # 20 steps: every other point is the table; between them the geometric mean (log-linear).
    tab = torch.tensor(indis.AYS_TABLES["sd15"], dtype=torch.float64)
    fine = indis.get_sigmas("ays", 20, float(tab[-1]), float(tab[0]), table="sd15")
    torch.testing.assert_close(fine[::2], tab)
    torch.testing.assert_close(fine[1::2], torch.sqrt(tab[:-1] * tab[1:]))


def test_as_grid_formats() -> None:
    kd = torch.tensor([10.0, 2.0, 0.5, 0.0])
    grid = indis.as_grid(kd, batch_size=3)
    assert grid.shape == (3, 4) and grid.stride(0) == 0  # broadcast view of a shared grid
    t = [1.0, 0.75, 0.5, 0.0]
    flow = indis.as_grid(timesteps=t, family=Flow())
    torch.testing.assert_close(flow[0], torch.tensor([float("inf"), 3.0, 1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="exactly one of"):
        indis.as_grid(kd, timesteps=t)
    with pytest.raises(ValueError, match="3 rows"):
        indis.as_grid(torch.ones(3, 4), batch_size=2)


@pytest.mark.parametrize("space", ["lambda", "t", "sigma"])
@pytest.mark.parametrize("kind", ["edm", "logsnr", "ays"])
def test_logits_reproduce_a_heuristic_exactly(space: str, kind: str) -> None:
    fam = VPLinear()
    sig = indis.get_sigmas(kind, 6, 0.01, 80.0)
    logits = indis.logits_from_grid(sig, space=space, family=fam)
    back = indis.grid_from_logits(logits, 0.01, 80.0, space=space, family=fam)
    torch.testing.assert_close(back, sig, rtol=1e-12, atol=0)


@settings(max_examples=60, deadline=None)
@given(logits=st.lists(st.floats(-8, 8), min_size=2, max_size=12),
       space=st.sampled_from(["lambda", "t", "sigma"]))
def test_monotone_map_properties(logits, space) -> None:
    """Logits give a strictly descending grid with exact endpoints; gradients flow to every logit.

    (Exact arithmetic makes any logits strictly monotone; in float64 a logit spread beyond ~35 makes a
    softmax weight vanish next to 1 and two points coincide, which the sampler then rejects as duplicates.)
    """
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    sig = indis.grid_from_logits(x, 0.002, 80.0, space=space)
    assert sig[0] == 80.0 and sig[-1] == 0.002
    assert (torch.diff(sig) < 0).all()
    if len(logits) > 2:
        sig[1:-1].sum().backward()
        assert torch.isfinite(x.grad).all()


def test_batched_logits_give_per_sample_grids() -> None:
    logits = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grid = indis.grid_from_logits(logits, torch.full((4,), 0.002, dtype=torch.float64), 80.0)
    assert grid.shape == (4, 6)
    for b in range(4):
        torch.testing.assert_close(grid[b], indis.grid_from_logits(logits[b], 0.002, 80.0))


def test_bad_heuristic_arguments() -> None:
    with pytest.raises(ValueError, match="kind='cosine'"):
        indis.get_sigmas("cosine", 5, 0.1, 10.0)
    with pytest.raises(ValueError, match="sigma_min"):
        indis.get_sigmas("edm", 5, 10.0, 0.1)
    with pytest.raises(ValueError, match="nfe"):
        indis.get_sigmas("edm", 0, 0.1, 10.0)


def test_get_sigmas_refuses_what_has_no_grid() -> None:
    import math

    with pytest.raises(ValueError, match="sigma_max=inf: kind='edm' cannot start there"):
        indis.get_sigmas("edm", 5, 0.002, math.inf)
    with pytest.raises(ValueError, match="sigma_max=inf: kind='uniform_t'"):
        indis.get_sigmas("uniform_t", 5, 0.002, math.inf)  # VE time is sigma: no finite start
    flow = indis.get_sigmas("uniform_t", 4, 0.002, math.inf, family="flow")
    assert math.isinf(flow[0]) and torch.isfinite(flow[1:]).all()
    for rho in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="rho"):
            indis.get_sigmas("edm", 5, 0.002, 80.0, rho=rho)
