"""INDIS predictor: init reproduces the heuristic, monotone grids for any logits, checkpoints, tuning."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import indis
from indis.engine.core.predictor import (
    HEURISTICS,
    PerInstanceSchedule,
    Predictor,
    PredictorConfig,
    ScheduleConfig,
)
from indis.engine.tuning.fit import (
    BLIND_FIT,
    PHI_FIT,
    FitConfig,
    blind_stage_config,
    evaluate,
    fit,
    fit_global,
    fit_oracle,
    fit_predictor,
)
from indis.engine.tuning.teacher import TeacherCache, TeacherSpec, noise_from_seeds


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
    """Exact denoiser of N(mu, I) data with mu = 0.5 (a cheap differentiable backbone)."""
    s2 = sigma.view(-1, *[1] * (x.ndim - 1)) ** 2
    return (x + 0.5 * s2) / (1 + s2)


@pytest.mark.parametrize("init", HEURISTICS)
@pytest.mark.parametrize("space", ["lambda", "t", "sigma"])
@pytest.mark.parametrize("final_zero", [False, True])
def test_init_reproduces_heuristic(init: str, space: str, final_zero: bool) -> None:
    sc = ScheduleConfig(nfe=5, sigma_min=0.002, sigma_max=80.0, init=init, space=space, final_zero=final_zero)
    for head in (Predictor(PredictorConfig(sc, "ipndm", (1, 8, 8), pool=4)),
                 Predictor(PredictorConfig(sc, "ipndm", (1, 8, 8), num_classes=10)),
                 Predictor(PredictorConfig(sc, "ipndm", (1, 8, 8), blind=True))):
        x = torch.randn(3, 1, 8, 8) * 80
        s = head(x, torch.tensor([0, 3, 9]) if head.config.num_classes else None)
        ref = sc.init_grid()
        torch.testing.assert_close(s.grid, ref.expand(3, -1), rtol=1e-12, atol=0)
        assert (s.grid[:, 0] == 80.0).all() and (s.grid[:, -1] == ref[-1]).all()
        assert (s.shift == 0).all() and (s.scale == 1).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-60, 60), min_size=10, max_size=10), st.sampled_from(["lambda", "t", "sigma"]),
       st.sampled_from(["ve", "vp_linear", "flow"]))
def test_grid_monotone_with_exact_endpoints_for_any_logits(logits, space, family) -> None:
    smax = 60.0 if family != "flow" else 200.0
    sc = ScheduleConfig(nfe=3, sigma_min=0.01, sigma_max=smax, family=family, space=space, shift_bound=0.2,
                        scale_bound=0.1)
    s = sc.decode(torch.tensor([logits], dtype=torch.float64))
    assert s.grid[0, 0] == smax and s.grid[0, -1] == 0.01
    assert (torch.diff(s.grid, dim=-1) < 0).all()
    assert (s.shift.abs() <= 0.2 + 1e-12).all() and ((s.scale - 1).abs() <= 0.1 + 1e-12).all()


def test_schedule_goes_straight_into_sample() -> None:
    sc = ScheduleConfig(nfe=4, sigma_min=0.002, sigma_max=80.0)
    head = Predictor(PredictorConfig(sc, "dpmpp_2m", (4,)))
    with torch.no_grad():
        head.out.weight.normal_(0, 0.5)
    x = torch.randn(5, 4, dtype=torch.float64) * 80
    s = head(x).detach()
    assert not torch.equal(s.grid[0], s.grid[1])  # instance-aware once trained
    out = indis.sample(gaussian_denoiser, x, s, "dpmpp_2m")
    ref = indis.sample(gaussian_denoiser, x, s.grid, "dpmpp_2m", shift=s.shift, scale=s.scale)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="Schedule"):
        indis.sample(gaussian_denoiser, x, s, "dpmpp_2m", shift=s.shift)


def test_predictor_input_errors() -> None:
    sc = ScheduleConfig(nfe=3, sigma_min=0.002, sigma_max=80.0)
    head = Predictor(PredictorConfig(sc, "euler", (1, 8, 8), num_classes=10))
    with pytest.raises(ValueError, match="sample shape"):
        head(torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="conditional"):
        head(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="solver"):
        PredictorConfig(sc, "rk4", (2,))
    with pytest.raises(ValueError, match="init"):
        ScheduleConfig(nfe=3, sigma_min=0.002, sigma_max=80.0, init="cosine")


def test_checkpoint_roundtrip_mismatch_and_corruption(tmp_path) -> None:
    sc = ScheduleConfig(nfe=3, sigma_min=0.002, sigma_max=80.0, shift_bound=0.2)
    head = Predictor(PredictorConfig(sc, "ipndm", (1, 8, 8), pool=2, backbone="digits-unet"))
    with torch.no_grad():
        head.out.weight.normal_()
    path = head.save(tmp_path / "phi.safetensors", note="test")
    loaded = Predictor.load(path, nfe=3, solver="ipndm", backbone="digits-unet")
    x = torch.randn(4, 1, 8, 8) * 80
    assert torch.equal(loaded(x).grid, head(x).grid) and loaded.metadata == {"note": "test"}
    with pytest.raises(ValueError, match="NFE=5"):
        Predictor.load(path, nfe=5)
    with pytest.raises(ValueError, match="solver='euler'"):
        Predictor.load(path, solver="euler")
    with pytest.raises(FileNotFoundError):
        Predictor.load(tmp_path / "missing.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits in the tensor data
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt"):
        Predictor.load(tmp_path / "flipped.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="not a readable"):
        Predictor.load(tmp_path / "truncated.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"indis": json.dumps({})})
    with pytest.raises(ValueError, match="no valid indis predictor metadata"):
        Predictor.load(tmp_path / "other.safetensors")


def test_teacher_cache_is_sharded_resumable_and_exact(tmp_path) -> None:
    kw = dict(backbone="gauss", shape=(4,), sigma_min=0.002, sigma_max=80.0,
              teacher=TeacherSpec("ipndm", 10), shard_size=8, dtype=torch.float64)
    cache = TeacherCache(tmp_path, **kw)
    cache.build(gaussian_denoiser, range(0, 20), progress=False)
    files = sorted(cache.dir.glob("seeds_*.safetensors"))
    assert [f.name for f in files] == [f"seeds_{a:09d}_{a + 8:09d}.safetensors" for a in (0, 8, 16)]
    stamp = files[0].stat().st_mtime_ns
    cache.build(gaussian_denoiser, range(0, 30), progress=False)  # resumes: old shards untouched
    assert files[0].stat().st_mtime_ns == stamp and len(list(cache.dir.glob("seeds_*"))) == 4
    data = cache.load(range(5, 13))
    x_T = noise_from_seeds(range(5, 13), (4,), dtype=torch.float64) * 80
    assert torch.equal(data.x_T, x_T)
    torch.testing.assert_close(data.x0, indis.sample(gaussian_denoiser, x_T, cache.teacher_grid(), "ipndm"),
                               rtol=0, atol=1e-12)
    other = TeacherCache(tmp_path, **{**kw, "teacher": TeacherSpec("ipndm", 20)})
    assert other.dir != cache.dir
    with pytest.raises(FileNotFoundError, match="build"):
        other.load(range(0, 4))


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


def test_cli_fit_then_eval(tmp_path, capsys) -> None:
    from indis.engine.cli import main

    out = tmp_path / "phi.safetensors"
    main(["fit", "--nfe", "2", "--solver", "euler", "--num-train", "16", "--num-val", "8", "--steps", "3",
          "--batch-size", "8", "--hidden", "8", "--cache", str(tmp_path), "--out", str(out)])
    phi = Predictor.load(out, nfe=2, solver="euler", backbone="digits-unet")
    assert len(phi.metadata["fit"]) == 2
    # --steps reaches the blind stage's Adam steps, which keeps the state after its L-BFGS finish
    assert phi.metadata["fit"][0]["best_step"] == 3 + BLIND_FIT.lbfgs_steps
    main(["eval", str(out), "--samples", "8", "--cache", str(tmp_path)])
    text = capsys.readouterr().out
    assert "INDIS phi" in text and "heuristic edm" in text and "8 held-out seeds" in text


def test_raw_from_grid_decodes_to_that_grid() -> None:
    sc = ScheduleConfig(nfe=3, sigma_min=0.002, sigma_max=80.0)
    grid = torch.tensor([80.0, 1.584, 0.5666, 0.002], dtype=torch.float64)
    s = sc.decode(sc.raw_from_grid(grid).unsqueeze(0))
    torch.testing.assert_close(s.grid[0], grid, rtol=1e-12, atol=0)
    assert (s.shift == 0).all() and (s.scale == 1).all()
    with pytest.raises(ValueError, match="shape"):
        sc.raw_from_grid(grid[:3])


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
