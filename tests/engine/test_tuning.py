"""Tuning entry points: the default start (best of GITS and the heuristics), the family taken from the model,
GITS for every family, the predictor checkpoint format."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import indis
from indis.engine.core.families import Denoiser, Flow, VPLinear
from indis.engine.core.predictor import FORMAT, Predictor, PredictorConfig, ScheduleConfig
from indis.engine.testbeds.mixtures import random_mixture
from indis.engine.tuning.fit import (
    FitConfig,
    fit,
    fit_gits,
    fit_global,
    fit_predictor,
    model_family,
    start_grid,
)
from indis.engine.tuning.teacher import TuningData

NO_STEPS = FitConfig(steps=0, progress=False)


def _data(model, n: int = 32, sigma_max: float = 80.0, family=None) -> TuningData:
    fam = family or indis.get_family("ve")
    x_T = torch.randn(n, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = x_T * fam.s(torch.tensor(sigma_max, dtype=torch.float64))
    x0 = indis.sample(model, x_T, indis.get_sigmas("edm", 40, 0.002, sigma_max, family=fam), "ipndm")
    return TuningData(torch.arange(n), x_T, None, x0)


def test_default_start_is_the_best_candidate_on_the_tuning_seeds() -> None:
    gmm = random_mixture(seed=1)
    data = _data(gmm)
    sc = ScheduleConfig(nfe=3, sigma_min=0.002, sigma_max=80.0)
    grid, start = start_grid(gmm, data, sc, "euler")
    assert set(start["candidates"]) == {"GITS", "heuristic edm", "heuristic logsnr", "heuristic uniform_t",
                                        "heuristic time_quadratic"}
    assert start["chosen"] == min(start["candidates"], key=start["candidates"].get)
    mse = float((indis.sample(gmm, data.x_T, grid, "euler") - data.x0).square().mean())
    assert mse == pytest.approx(start["candidates"][start["chosen"]], rel=1e-12)
    assert mse < start["candidates"]["heuristic edm"]  # on this mixture the default is not EDM
    common = dict(nfe=3, solver="euler", shape=(16,), sigma_min=0.002, sigma_max=80.0, data=(data, data))
    phi = fit_predictor(gmm, **common, fit_config=NO_STEPS, blind_config=NO_STEPS)
    torch.testing.assert_close(phi(data.x_T).grid, grid.expand(len(data), -1), rtol=1e-12, atol=0)
    assert phi.start["chosen"] == start["chosen"] and phi.start["grid"] == grid.tolist()
    ld3 = fit_global(gmm, **common, fit_config=NO_STEPS)
    torch.testing.assert_close(ld3.grid, grid, rtol=1e-12, atol=0)
    edm = fit_predictor(gmm, **common, init="edm", fit_config=NO_STEPS, blind_config=NO_STEPS)
    torch.testing.assert_close(edm(data.x_T[:1]).grid[0], indis.get_sigmas("edm", 3, 0.002, 80.0),
                               rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="init"):
        fit_predictor(gmm, **common, init="cosine")


def _vp_eps(gmm, fam):
    def eps_net(x_vp, t):
        sigma = fam.sigma(t).view(-1, 1)
        x_ve = x_vp * torch.sqrt(1 + sigma**2)
        return (x_ve - gmm(x_ve, sigma.flatten())) / sigma

    return Denoiser(eps_net, fam, "eps", "t")


def test_the_family_comes_from_the_model(tmp_path) -> None:
    """A VP denoiser's teacher and student start from its own x_T scale (~1 * noise, not 50 * noise)."""
    gmm = random_mixture(seed=2)
    fam = VPLinear()
    den = _vp_eps(gmm, fam)
    assert model_family(den) == "vp_linear" and model_family(gmm) == "ve"
    common = dict(nfe=3, solver="euler", shape=(16,), sigma_min=0.01, sigma_max=50.0, num_train=16,
                  num_val=8, cache_dir=str(tmp_path), fit_config=NO_STEPS, blind_config=NO_STEPS,
                  teacher=indis.TeacherSpec("ipndm", 10), init="logsnr")
    phi = fit_predictor(den, **common)
    assert phi.config.schedule.family == "vp_linear"
    assert phi.config.input_scale == pytest.approx(1 / float(fam.s(torch.tensor(50.0, dtype=torch.float64))))
    with pytest.raises(ValueError, match="family='ve' does not match"):
        fit_predictor(den, **common, family="ve")
    with pytest.raises(ValueError, match="family='ve' does not match"):
        fit_global(den, **{k: v for k, v in common.items() if k != "blind_config"}, family="ve")
    with pytest.raises(ValueError, match="does not match"):
        model_family(gmm, "flow")


def test_gits_works_in_every_family() -> None:
    """VP: the grid GITS finds on a VP eps model of a mixture equals the one on its VE denoiser (costs in VE
    units). Flow from t = 1 with a final step to 0: a well-formed grid through sigma_min."""
    gmm = random_mixture(seed=3)
    x_ve = torch.randn(16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 50.0
    fam = VPLinear()
    ve = fit_gits(gmm, x_ve, nfe=4, sigma_min=0.01, sigma_max=50.0, fine_steps=20)
    vp = fit_gits(_vp_eps(gmm, fam), x_ve * fam.alpha(torch.tensor(50.0, dtype=torch.float64)), nfe=4,
                  sigma_min=0.01, sigma_max=50.0, fine_steps=20)
    assert ve.shape == (5,) and ve[0] == 50.0 and ve[-1] == 0.01 and bool((torch.diff(ve) < 0).all())
    torch.testing.assert_close(vp, ve, rtol=1e-12, atol=0)

    def velocity(x_t, t):
        t = t.view(-1, 1)
        return (x_t - gmm.denoise_scaled(x_t, 1 - t, t)) / t

    flow = Denoiser(velocity, Flow(), "velocity", "t")
    x_1 = torch.randn(16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g = fit_gits(flow, x_1, nfe=4, sigma_min=0.002, sigma_max=float("inf"), fine_steps=20, final_zero=True)
    assert g.shape == (5,) and torch.isinf(g[0]) and g[-2] == 0.002 and g[-1] == 0
    assert bool((torch.diff(g) < 0).all())
    out = indis.sample(flow, x_1, g, "euler")
    assert torch.isfinite(out).all()


def test_checkpoints_of_the_old_scale_definition_are_refused(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    head = Predictor(PredictorConfig(ScheduleConfig(nfe=3, sigma_min=0.002, sigma_max=80.0), "euler", (4,)))
    path = head.save(tmp_path / "phi.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["indis"])
    assert meta["format"] == FORMAT
    meta["format"] = "indis-predictor/1"
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata={"indis": json.dumps(meta)})
    with pytest.raises(ValueError, match="denoised x0.*re-tune"):
        Predictor.load(tmp_path / "old.safetensors")
    meta["format"] = "something-else/9"
    save_file(load_file(str(path)), str(tmp_path / "odd.safetensors"), metadata={"indis": json.dumps(meta)})
    with pytest.raises(ValueError, match=f"expected '{FORMAT}'"):
        Predictor.load(tmp_path / "odd.safetensors")
    meta["format"] = "indis-predictor/2"
    save_file(load_file(str(path)), str(tmp_path / "v2.safetensors"), metadata={"indis": json.dumps(meta)})
    with pytest.raises(ValueError, match="checksum covered only its tensors"):
        Predictor.load(tmp_path / "v2.safetensors")


def test_shrink_toward_the_mean_is_folded_into_the_weights_exactly() -> None:
    from indis.engine.tuning.fit import shrink_toward_mean

    gmm = random_mixture(seed=4)
    data = _data(gmm, n=48)
    sc = ScheduleConfig(nfe=3, sigma_min=0.002, sigma_max=80.0)
    head = Predictor(PredictorConfig(sc, "euler", (16,), hidden=16))
    torch.nn.init.normal_(head.out.weight, std=0.5)  # a phi whose schedule depends on x_T
    with torch.no_grad():
        before = head.raw(data.x_T)
        mean = before.mean(0)
    assert shrink_toward_mean(head, gmm, data, data, "euler", factors=(0.5,)) == 0.5
    with torch.no_grad():
        torch.testing.assert_close(head.raw(data.x_T), mean + 0.5 * (before - mean), rtol=1e-6, atol=1e-9)
    assert shrink_toward_mean(head, gmm, data, data, "euler", factors=(0.0,)) == 0.0
    grids = head(data.x_T).grid  # a = 0: one global schedule, the mean one, for every sample
    torch.testing.assert_close(grids, sc.decode(mean[None]).grid.expand_as(grids), rtol=1e-9, atol=0)
    torch.manual_seed(0)
    fresh = Predictor(head.config)  # fitted to the seeds it is validated on: its instance part helps there
    fit(fresh, gmm, data, data, "euler", FitConfig(steps=150, batch_size=48, lr=1e-2, progress=False))
    with torch.no_grad():
        raw = fresh.raw(data.x_T)
        losses = {}
        for a in (1.0, 0.5, 0.0):  # per-seed validation losses of each factor, from the definition
            s = sc.decode(raw.mean(0) + a * (raw - raw.mean(0)))
            losses[a] = (indis.sample(gmm, data.x_T, s, "euler") - data.x0).square().mean(1).double()
    gain = {a: losses[0.0] - losses[a] for a in (1.0, 0.5)}  # paired: how much each beats the mean schedule
    z = {a: float(g.mean() / (g.std() / len(g) ** 0.5)) for a, g in gain.items()}
    assert max(z.values()) > 0.0  # at margin 0 an instance-aware factor wins, at the larger one the mean
    for margin in (0.0, 0.5 * max(z.values()), max(z.values()) + 1.0):  # all pass, the top one passes, none
        passing = [a for a in (1.0, 0.5) if z[a] > margin] + [0.0]
        expected = min(passing, key=lambda a: float(losses[a].mean()))
        assert shrink_toward_mean(copy.deepcopy(fresh), gmm, data, data, "euler", margin=margin) == expected
    blind = Predictor(PredictorConfig(sc, "euler", (16,), blind=True))
    assert shrink_toward_mean(blind, gmm, data, data, "euler") == 1.0
    for bad in (dict(factors=()), dict(margin=-1.0), dict(margin=float("nan"))):
        with pytest.raises(ValueError):
            shrink_toward_mean(fresh, gmm, data, data, "euler", **bad)


def test_a_shrink_factor_beats_the_mean_schedule_only_by_the_paired_margin() -> None:
    from indis.engine.tuning.fit import _beats

    null = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    loss = null - torch.tensor([0.5, 1.5, 0.5, 1.5], dtype=torch.float64)  # gain: mean 1, s.e. 0.2887
    se = 0.5773502691896257 / 2
    assert _beats(loss, null, 1 / se - 0.01) and not _beats(loss, null, 1 / se + 0.01)
    assert _beats(null - 1.0, null, 100.0)  # a constant gain has no spread: it beats any margin
    assert not _beats(null, null, 0.0)  # no gain
    assert not _beats(loss[:1], null[:1], 0.0)  # one seed: no standard error, no evidence
    inf_null = torch.tensor([1.0, float("inf")], dtype=torch.float64)
    assert _beats(torch.tensor([1.0, 2.0], dtype=torch.float64), inf_null, 2.0)
    assert not _beats(inf_null, inf_null, 0.0)
