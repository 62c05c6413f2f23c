"""Tuning (``indis.engine.tuning.fit``): phi, LD3-global and the oracle lower the teacher loss; the fit loop
(early stopping, keep="last", the feature term, the L-BFGS finish); the default start (best of GITS and the
heuristics), the family taken from the model, GITS in every family and its dynamic programme; shrinkage
toward the mean schedule."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import indis
from indis.engine.core.families import Denoiser, Flow, VPLinear
from indis.engine.core.predictor import PerInstanceSchedule, Predictor, PredictorConfig, ScheduleConfig
from indis.engine.core.sampling import sample
from indis.engine.core.schedules import get_sigmas
from indis.engine.testbeds.mixtures import random_mixture
from indis.engine.tuning.fit import (
    BLIND_FIT,
    PHI_FIT,
    FitConfig,
    blind_stage_config,
    evaluate,
    fit,
    fit_gits,
    fit_global,
    fit_oracle,
    fit_predictor,
    model_family,
    start_grid,
)
from indis.engine.tuning.teacher import TeacherCache, TeacherSpec, TuningData, noise_from_seeds
from tests.helpers import gaussian_denoiser, toy_mixture


def test_tuning_improves_and_keeps_best(tmp_path) -> None:
    """phi, LD3-global and the oracle all lower the teacher loss of the EDM init on a toy backbone."""
    torch.manual_seed(0)
    kw = dict(nfe=2, solver="euler", shape=(4,), sigma_min=0.002, sigma_max=80.0, backbone="gauss",
              teacher=TeacherSpec("ipndm", 20), cache_dir=str(tmp_path), shift_bound=0.2)
    fc = FitConfig(steps=40, batch_size=32, lr=2e-2, val_every=10, progress=False)
    phi = fit_predictor(gaussian_denoiser, **kw, scale_bound=0.1, hidden=16, num_train=64, num_val=32,
                        fit_config=fc)
    blind, full = phi.fit_results
    assert blind.best_val < 0.7 * blind.init_val
    assert full.best_val <= blind.best_val
    g = fit_global(gaussian_denoiser, **kw, num_train=32, num_val=32)
    assert g.grid.shape == (3,) and g.shift.shape == (2,)
    assert g.fit_result.best_val < g.fit_result.init_val
    setup_data = TeacherCache(tmp_path, backbone="gauss", shape=(4,), sigma_min=0.002, sigma_max=80.0,
                              teacher=TeacherSpec("ipndm", 20)).load(range(0, 16))
    oracle = fit_oracle(gaussian_denoiser, setup_data, phi.config,
                        FitConfig(steps=30, batch_size=16, lr=0.05, progress=False, val_every=10))
    per = evaluate(oracle, gaussian_denoiser, setup_data, "euler", per_instance=True)
    init = evaluate(Predictor(phi.config), gaussian_denoiser, setup_data, "euler")
    assert per.mean() < init.mean()
    with pytest.raises(ValueError, match="index"):
        oracle(setup_data.x_T)
    assert isinstance(oracle, PerInstanceSchedule)


def test_fit_early_stopping_restores_best() -> None:
    sc = ScheduleConfig(nfe=2, sigma_min=0.002, sigma_max=80.0)
    head = Predictor(PredictorConfig(sc, "euler", (4,), blind=True))
    from indis.engine.tuning.teacher import TuningData

    x_T = noise_from_seeds(range(8), (4,), dtype=torch.float64) * 80
    target = indis.sample(gaussian_denoiser, x_T, sc.init_grid(), "euler")  # the init is already optimal
    data = TuningData(torch.arange(8), x_T, None, target)
    res = fit(head, gaussian_denoiser, data, data, "euler",
              FitConfig(steps=50, lr=0.5, val_every=1, patience=3, progress=False))
    assert res.stopped_early and res.best_step == 0 and res.best_val == pytest.approx(0, abs=1e-20)
    torch.testing.assert_close(head(x_T).grid[0], sc.init_grid(), rtol=1e-12, atol=0)


def test_fit_keep_last_returns_the_final_state() -> None:
    """keep="last" runs every step and returns where the optimiser ended, even when validation got worse:
    the same state as a run with no validation set at all."""
    from indis.engine.tuning.teacher import TuningData

    sc = ScheduleConfig(nfe=2, sigma_min=0.002, sigma_max=80.0)
    x_T = noise_from_seeds(range(8), (4,), dtype=torch.float64) * 80
    target = indis.sample(gaussian_denoiser, x_T, sc.init_grid(), "euler")  # the init is already optimal
    val = TuningData(torch.arange(8), x_T, None, target)
    train = TuningData(torch.arange(8), x_T, None, 0.5 * target)  # pulls the head away from the optimum
    heads = [Predictor(PredictorConfig(sc, "euler", (4,), blind=True)) for _ in range(2)]
    cfg = FitConfig(steps=20, lr=0.1, val_every=1, patience=3, keep="last", progress=False)
    res = fit(heads[0], gaussian_denoiser, train, val, "euler", cfg)
    fit(heads[1], gaussian_denoiser, train, None, "euler", cfg)
    assert not res.stopped_early and res.best_step == 20 and len(res.history) == 20
    assert res.best_val == res.history[-1]["val"] > res.init_val  # validation got worse, the state is kept
    torch.testing.assert_close(heads[0].base, heads[1].base, rtol=0, atol=0)
    assert not torch.allclose(heads[0].base, Predictor(heads[0].config).base)
    with pytest.raises(ValueError, match="keep"):
        FitConfig(keep="final")
    for bad in ({"steps": -1}, {"batch_size": 0}, {"val_every": 0}, {"patience": 0}, {"lbfgs_steps": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FitConfig(**bad)
    for bad in ({"lbfgs_steps": 3}, {"lbfgs_steps": 3, "keep": "last", "soft_teacher": True}):
        with pytest.raises(ValueError, match="lbfgs_steps needs keep='last' and no soft teacher"):
            FitConfig(**bad)


def test_fit_adds_the_weighted_feature_distance_to_the_loss() -> None:
    """With features = the flattened end point (d = 4), the feature term is 4 x the per-sample MSE, so the
    first step's objective (before any update) is (1 + 4 w) x the plain one."""
    from indis.engine.tuning.teacher import TuningData

    sc = ScheduleConfig(nfe=2, sigma_min=0.002, sigma_max=80.0)
    x_T = noise_from_seeds(range(16), (4,), dtype=torch.float64) * 80
    teacher = indis.sample(gaussian_denoiser, x_T, ScheduleConfig(20, 0.002, 80.0).init_grid(), "ipndm")
    data = TuningData(torch.arange(16), x_T, None, teacher)
    cfg = FitConfig(steps=1, batch_size=16, keep="last", progress=False)
    first = []
    for weight in (0.0, 0.5):
        head = Predictor(PredictorConfig(sc, "euler", (4,), blind=True)).double()
        res = fit(head, gaussian_denoiser, data, None, "euler", replace(cfg, feature_weight=weight),
                  feature_net=lambda x: x.flatten(1))
        first.append(res.history[0]["train"])
    assert first[0] > 0
    assert first[1] == pytest.approx(3.0 * first[0], rel=1e-12)


def test_fit_lbfgs_finish_reaches_a_stationary_point_of_the_full_batch_loss() -> None:
    """The L-BFGS finish minimises the mean loss over the whole training split: from the start it lowers
    that loss and shrinks its gradient by orders of magnitude, which Adam's steps alone do not."""
    from indis.engine.tuning.fit import sample_loss, unroll
    from indis.engine.tuning.teacher import TuningData

    sc = ScheduleConfig(nfe=2, sigma_min=0.002, sigma_max=80.0, scale_bound=0.1)
    x_T = noise_from_seeds(range(32), (4,), dtype=torch.float64) * 80
    teacher = indis.sample(gaussian_denoiser, x_T, ScheduleConfig(20, 0.002, 80.0).init_grid(), "ipndm")
    data = TuningData(torch.arange(32), x_T, None, teacher)

    def loss_and_grad(head: Predictor) -> tuple[float, float]:
        head.zero_grad()
        loss = sample_loss(unroll(head, gaussian_denoiser, x_T, None, "euler"), teacher, "l2").mean()
        loss.backward()
        return float(loss.detach()), float(torch.cat([p.grad.flatten() for p in head.parameters()]).norm())

    heads = [Predictor(PredictorConfig(sc, "euler", (4,), blind=True)).double()
             for _ in range(3)]
    loss0, grad0 = loss_and_grad(heads[0])
    assert grad0 > 0
    adam = FitConfig(steps=20, batch_size=32, lr=1e-2, keep="last", progress=False)
    fit(heads[1], gaussian_denoiser, data, None, "euler", adam)
    res = fit(heads[2], gaussian_denoiser, data, data, "euler", replace(adam, lbfgs_steps=20))
    loss_adam, grad_adam = loss_and_grad(heads[1])
    loss_lbfgs, grad_lbfgs = loss_and_grad(heads[2])
    assert loss_lbfgs < loss_adam < loss0
    assert grad_lbfgs < 1e-3 * grad0 and grad_lbfgs < 1e-2 * grad_adam
    assert res.best_step == 40 and res.history[-1]["step"] == 40
    assert 1 <= res.history[-1]["lbfgs_evaluations"] <= 30
    assert res.best_val == pytest.approx(loss_lbfgs, rel=1e-9)


def test_blind_stage_keeps_its_budget_when_only_phi_is_configured() -> None:
    assert blind_stage_config(None) is BLIND_FIT
    cfg = blind_stage_config(replace(PHI_FIT, lr=5e-3, batch_size=32, seed=7, loss="huber"))
    assert (cfg.steps, cfg.val_every, cfg.keep, cfg.lbfgs_steps) == (BLIND_FIT.steps, BLIND_FIT.val_every,
                                                                       "last", BLIND_FIT.lbfgs_steps)
    assert (cfg.lr, cfg.batch_size, cfg.seed, cfg.loss) == (BLIND_FIT.lr, 32, 7, "huber")
    assert blind_stage_config(replace(PHI_FIT, lr=0.1)).lr == 0.1


def test_fit_from_an_init_grid_starts_there() -> None:
    from indis.engine.tuning.teacher import TuningData

    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0)) * 80
    x0 = indis.sample(gaussian_denoiser, x_T, indis.get_sigmas("edm", 30, 0.002, 80.0), "ipndm")
    data = TuningData(torch.arange(16), x_T, None, x0)
    grid = torch.tensor([80.0, 1.584, 0.5666, 0.002], dtype=torch.float64)
    common = dict(nfe=3, solver="euler", shape=(2,), sigma_min=0.002, sigma_max=80.0, data=(data, data),
                  init_grid=grid, fit_config=FitConfig(steps=0, progress=False))
    phi = fit_predictor(gaussian_denoiser, **common, blind_config=FitConfig(steps=0, progress=False))
    torch.testing.assert_close(phi(x_T).grid, grid.expand(16, -1), rtol=1e-12, atol=0)
    torch.testing.assert_close(fit_global(gaussian_denoiser, **common).grid, grid, rtol=1e-12, atol=0)


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


def test_gits_dynamic_programming_is_the_best_path() -> None:
    import itertools

    from indis.engine.tuning.fit import fit_gits

    model = toy_mixture()
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10
    fine = get_sigmas("edm", 6, 0.002, 10.0)
    assert torch.equal(fit_gits(model, x_T, nfe=6, sigma_min=0.002, sigma_max=10.0, fine_steps=6), fine)
    states = []  # the state at each grid point: what the network saw at each step, then the result
    states.append(sample(model, x_T, fine, "ipndm", callback=lambda d: states.append(d["x"])))

    def euler_cost(i: int, j: int) -> float:
        d = model(states[i], fine[i].expand(8))
        step = states[i] + (fine[j] - fine[i]) * (states[i] - d) / fine[i]
        return float((step - states[j]).square().mean())

    paths = [(0, a, b, 6) for a, b in itertools.combinations(range(1, 6), 2)]
    best = min(paths, key=lambda p: sum(euler_cost(i, j) for i, j in zip(p, p[1:], strict=False)))
    grid = fit_gits(model, x_T, nfe=3, sigma_min=0.002, sigma_max=10.0, fine_steps=6)
    torch.testing.assert_close(grid, fine[list(best)], rtol=0, atol=0)
    with pytest.raises(ValueError, match="nfe"):
        fit_gits(model, x_T, nfe=7, sigma_min=0.002, sigma_max=10.0, fine_steps=6)


def test_phi_tunes_on_a_text_unet_with_guidance_and_a_pooled_embedding(tmp_path) -> None:
    """A tiny diffusers UNet2DConditionModel with latents (4, 16, 16), CFG 5 with a shared negative prompt,
    text embeddings per seed from a prompt list, and phi conditioned on the mean-pooled embedding: the
    teacher shards keep the conditions with the seeds (the teacher is the guided model on them), the blind
    stage lowers the teacher loss, phi reads the pooled embedding, and another scale is another cache."""
    diffusers = pytest.importorskip("diffusers")
    from indis.engine.testbeds.tiny_diffusers import TEXT, text_unet

    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                  beta_end=0.012)
    den = indis.from_diffusers(text_unet(sample_size=16), sched)
    prompts = torch.randn(6, 5, 12, generator=torch.Generator().manual_seed(0))  # a "prompt list", encoded

    def conditions(seeds: torch.Tensor):
        emb = prompts[seeds % len(prompts)]
        return {TEXT: emb}, emb.mean(1)

    model = indis.guided(den, {TEXT: torch.zeros(1, 5, 12)}, 5.0)
    fc = FitConfig(steps=6, batch_size=8, lr=1e-2, val_every=3, progress=False)
    bc = FitConfig(steps=12, batch_size=16, lr=5e-2, val_every=6, keep="last", progress=False)
    kw = dict(nfe=3, solver="dpmpp_2m", shape=(4, 16, 16), sigma_min=0.03, sigma_max=14.0, init="logsnr",
              teacher=TeacherSpec("dpmpp_2m", 12), num_train=16, num_val=8, cache_dir=str(tmp_path),
              backbone="tiny-text-unet", hidden=16, cond_dim=12, pool=4, conditions=conditions,
              conditions_key="six-random-prompts", fit_config=fc, blind_config=bc)
    phi = fit_predictor(model, **kw)
    assert phi.config.cond_dim == 12 and phi.config.schedule.family == "vp_linear"
    blind, full = phi.fit_results
    assert blind.best_val < blind.init_val and full.best_val <= blind.best_val
    (cache_dir,) = list(tmp_path.iterdir())
    from safetensors.torch import load_file

    shard = load_file(str(next(cache_dir.glob("seeds_*.safetensors"))))
    assert torch.equal(shard[f"cond.{TEXT}"][:24], prompts[torch.arange(24) % 6])
    seeds = torch.arange(2)
    x_T = indis.noise_from_seeds(seeds, (4, 16, 16)) * float(den.family.s(torch.tensor(14.0)))
    grid = indis.get_sigmas("edm", 12, 0.03, 14.0, family="vp_linear")
    teacher = indis.sample(model, x_T, grid, "dpmpp_2m", cond={TEXT: prompts[seeds]})
    assert float((teacher - shard["x0"][:2]).abs().max()) <= 1e-5 * float(teacher.abs().max())
    with torch.no_grad():
        a, b = phi(x_T, prompts[:2].mean(1)), phi(x_T, prompts[2:4].mean(1))
    assert not torch.equal(a.grid, b.grid)  # the schedule depends on the text
    with pytest.raises(ValueError, match="cond_dim=8"):
        fit_predictor(model, **{**kw, "cond_dim": 8})
    stronger = indis.guided(den, {TEXT: torch.zeros(1, 5, 12)}, 7.5)
    fit_global(stronger, **{k: v for k, v in kw.items() if k not in ("hidden", "cond_dim", "pool",
                                                                      "blind_config")})
    assert len(list(tmp_path.iterdir())) == 2  # other guidance: other teacher end points
