"""The quality harness: one cell end to end on a cheap exact mixture, the exhaustive oracle, heads, report."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from indis.engine.core.predictor import Predictor, PredictorConfig, ScheduleConfig
from indis.engine.core.sampling import sample
from indis.engine.core.schedules import Schedule, get_sigmas
from indis.engine.generation import Backbone, image_grid, resolve_schedule
from indis.engine.studies.quality import (
    AYS_ROW,
    GITS_ROW,
    HELD_OUT,
    MEAN_ROW,
    Testbed,
    _save_grid,
    add_controls,
    exhaustive_grids,
    gain,
    generate,
    load_heads,
    load_phi,
    markdown,
    mean_schedule,
    needs_controls,
    override,
    plots,
    run_cell,
    sample_pictures,
)
from indis.engine.tuning.fit import FitConfig, fit_predictor, sample_loss
from indis.engine.tuning.teacher import TeacherCache, TeacherSpec
from tests.helpers import ROOT, toy_mixture

TOY = Testbed("toy", toy_mixture, (2,), 10.0, solver="euler", nfes=(3,), teacher=TeacherSpec("ipndm", 40),
              dtype=torch.float64, dataset=None, shard_size=32, num_train=64, num_val=32, pool=None,
              phi=FitConfig(steps=6, batch_size=32, lr=1e-2, val_every=3, progress=False),
              blind=FitConfig(steps=6, batch_size=32, lr=3e-2, val_every=3, progress=False),
              ld3=FitConfig(steps=4, batch_size=16, lr=0.005, optimizer="rmsprop", soft_teacher=True,
                            clip=None, progress=False))


@pytest.fixture(scope="module")
def toy_cell(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, object]:
    root = tmp_path_factory.mktemp("quality")
    record = run_cell(TOY, 3, samples=24, cache_dir=str(root / "cache"), heads_dir=root / "heads",
                      progress=False)
    return record, root


def test_cell_measures_every_method_on_the_same_held_out_seeds(toy_cell) -> None:
    record, root = toy_cell
    assert record["fit_configs"]["blind"] == {k: v for k, v in TOY.blind.__dict__.items() if k != "progress"}
    assert record["fit_configs"]["phi"]["steps"] == TOY.phi.steps
    rows = record["rows"]
    expected = {"heuristic edm", "heuristic logsnr", "heuristic uniform_t", "heuristic time_quadratic",
                AYS_ROW, "LD3-global", "phi blind (ablation)", "INDIS phi", "INDIS phi, no shift/scale",
                "best pure grid (exhaustive)", "oracle pure grid (exhaustive)", "oracle phi-capacity (Adam)"}
    assert set(rows) == expected
    assert all(math.isfinite(r["mse"]) and r["mse"] > 0 for r in rows.values())
    # the heuristic row is the EDM grid's teacher MSE, recomputed here independently
    from indis.engine.tuning.teacher import TeacherCache

    cache = TeacherCache(root / "cache", backbone="toy", shape=(2,), sigma_min=0.002, sigma_max=10.0,
                         teacher=TeacherSpec("ipndm", 40), shard_size=32, dtype=torch.float64)
    held = cache.load(range(*record["held_out_seeds"]))
    x = sample(toy_mixture(), held.x_T, get_sigmas("edm", 3, 0.002, 10.0), "euler")
    edm = float(sample_loss(x, held.x0, "l2").mean())
    assert rows["heuristic edm"]["mse"] == pytest.approx(edm, rel=1e-9)
    # its paired standard error against phi, recomputed from phi's saved head on the same seeds
    phi = load_phi(root / "heads", TOY, 3)
    with torch.no_grad():
        phi_losses = sample_loss(sample(toy_mixture(), held.x_T, phi(held.x_T), "euler"), held.x0, "l2")
    diff = sample_loss(x, held.x0, "l2") - phi_losses
    assert rows["heuristic edm"]["se_vs_phi"] == pytest.approx(float(diff.std() / len(diff) ** 0.5), rel=1e-6)
    assert rows["INDIS phi"]["se_vs_phi"] == 0.0
    best = record["best_global"]
    assert rows[best]["kind"] == "global"
    assert rows[best]["mse"] == min(r["mse"] for r in rows.values() if r["kind"] == "global")
    assert gain(record) == pytest.approx(rows["INDIS phi"]["mse"] / rows[best]["mse"] - 1)
    # the per-instance oracle with phi's capacity starts from phi's blind schedule, so it cannot be worse
    assert rows["oracle phi-capacity (Adam)"]["mse"] <= rows["phi blind (ablation)"]["mse"] * (1 + 1e-9)
    assert rows["oracle pure grid (exhaustive)"]["mse"] <= rows["best pure grid (exhaustive)"]["mse"]
    assert len(record["grids"]["phi"]) == 24 and len(record["grids"]["phi"][0]) == 4
    # every tuned head started where fit_predictor starts by default: the best candidate on tuning seeds
    cands = record["start"]["candidates"]
    assert record["start"]["chosen"] == min(cands, key=cands.get) and "GITS" in cands
    json.dumps(record)  # the cell is JSON-able as written to disk


def test_heads_roundtrip_and_refuse_a_mismatch(toy_cell) -> None:
    record, root = toy_cell
    heads = load_heads(root / "heads", TOY, 3)
    assert heads is not None and set(heads) == {"phi", "blind", "phi_noss", "ld3"}
    x = torch.randn(5, 2, dtype=torch.float64) * 10
    s = heads["phi"](x, None)
    assert s.grid.shape == (5, 4) and s.shift.shape == (5, 3)
    assert heads["ld3"](x, None).grid.shape == (4,)
    assert load_heads(root / "heads", TOY, 5) is None  # nothing saved for NFE 5
    wrong = root / "wrong"
    wrong.mkdir()
    for f in (root / "heads").iterdir():  # NFE-3 heads filed under NFE 5
        (wrong / f.name.replace("nfe3", "nfe5")).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="tuned for NFE=3"):
        load_heads(wrong, TOY, 5)


def test_mean_schedule_control(toy_cell) -> None:
    record, root = toy_cell
    out = add_controls(record, TOY, root / "heads", str(root / "cache"))
    for name in (MEAN_ROW, GITS_ROW):
        assert out["rows"][name]["kind"] == "global" and math.isfinite(out["rows"][name]["mse"])
    assert out["rows"][out["best_global"]]["mse"] == min(r["mse"] for r in out["rows"].values()
                                                         if r["kind"] == "global")
    # the control is phi's average raw output decoded: for a blind phi it is exactly its schedule
    phi = load_heads(root / "heads", TOY, 3)["blind"]
    x = torch.randn(7, 2, dtype=torch.float64) * 10
    fn = mean_schedule(phi, x, None)
    torch.testing.assert_close(fn(x, None).grid, phi(x[:1]).grid[0], rtol=1e-12, atol=0)
    # the GITS grid is saved where indis generate reads grids, and it is the grid that was measured
    gits_file = root / "heads" / "toy_euler_nfe3_gits.json"
    saved = json.loads(gits_file.read_text())
    assert (saved["backbone"], saved["solver"], saved["held_out"]) == ("toy", "euler", out["rows"][GITS_ROW])
    backbone = Backbone(lambda w: toy_mixture(), (2,), 0, "none", sigma_max=10.0)
    grid = resolve_schedule(str(gits_file), toy_mixture(), backbone, 3, "euler", name="toy")(x, None).grid
    assert grid.shape == (4,) and bool((grid[1:] < grid[:-1]).all())
    cache = TeacherCache(root / "cache", backbone="toy", shape=(2,), sigma_min=0.002, sigma_max=10.0,
                         teacher=TeacherSpec("ipndm", 40), shard_size=32, dtype=torch.float64)
    held = cache.load(range(*record["held_out_seeds"]))
    gits_losses = sample_loss(sample(toy_mixture(), held.x_T, grid, "euler"), held.x0, "l2")
    assert out["rows"][GITS_ROW]["mse"] == pytest.approx(float(gits_losses.mean()), rel=1e-9)
    # each control carries its paired standard error against the saved phi, computed here independently
    with torch.no_grad():
        phi_losses = sample_loss(sample(toy_mixture(), held.x_T, load_phi(root / "heads", TOY, 3)(held.x_T),
                                        "euler"), held.x0, "l2")
    diff = gits_losses - phi_losses
    assert out["rows"][GITS_ROW]["se_vs_phi"] == pytest.approx(float(diff.std() / len(diff) ** 0.5), rel=1e-6)
    assert out["rows"][MEAN_ROW]["se_vs_phi"] >= 0.0  # 0 where phi was shrunk to its mean
    assert not needs_controls(out, TOY, root / "heads")
    # a cell whose controls were measured without it gets it from the saved heads and GITS grid
    bare = {**out, "rows": {k: {m: v for m, v in r.items() if m != "se_vs_phi"} if k in (MEAN_ROW, GITS_ROW)
                            else r for k, r in out["rows"].items()}}
    assert needs_controls(bare, TOY, root / "heads")
    again = add_controls(bare, TOY, root / "heads", str(root / "cache"))
    for name in (MEAN_ROW, GITS_ROW):
        assert again["rows"][name]["se_vs_phi"] == pytest.approx(out["rows"][name]["se_vs_phi"], rel=1e-9)
        assert again["rows"][name]["mse"] == pytest.approx(out["rows"][name]["mse"], rel=1e-12)
    assert not needs_controls(bare, TOY, root / "elsewhere")  # nothing saved there: nothing to add
    assert not needs_controls(bare, TOY, root / "heads", paired_se=False)  # --report-only adds no s.e.
    only_phi = root / "only_phi"  # phi alone is enough (the committed digits-dit / gmm heads are phi only)
    only_phi.mkdir()
    for f in ("toy_euler_nfe3_phi.safetensors", "toy_euler_nfe3_gits.json"):
        (only_phi / f).write_bytes((root / "heads" / f).read_bytes())
    assert needs_controls(bare, TOY, only_phi)
    assert add_controls(bare, TOY, only_phi, str(root / "cache"))["rows"][GITS_ROW]["se_vs_phi"] == \
        pytest.approx(out["rows"][GITS_ROW]["se_vs_phi"], rel=1e-9)
    other = {**bare, "rows": {**bare["rows"], "INDIS phi": {**bare["rows"]["INDIS phi"], "mse": 1.0}}}
    with pytest.raises(ValueError, match="another run's heads"):  # heads of another run: refused
        add_controls(other, TOY, root / "heads", str(root / "cache"))


def test_mean_schedule_of_a_class_conditional_phi_covers_absent_classes() -> None:
    """Per class, phi's raw output averaged over that class's seeds; a class with no seed gets the average
    over all seeds (not a NaN schedule)."""
    torch.manual_seed(0)
    phi = Predictor(PredictorConfig(ScheduleConfig(3, 0.002, 10.0), "euler", (2,), num_classes=3)).double()
    for p in phi.parameters():
        torch.nn.init.normal_(p, std=0.3)  # a phi whose output depends on x_T and the class
    x = torch.randn(8, 2, dtype=torch.float64) * 10
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])  # class 2 absent
    fn = mean_schedule(phi, x, labels)
    decode = phi.config.schedule.decode
    for k, rows in ((0, labels == 0), (1, labels == 1), (2, torch.ones(8, dtype=torch.bool))):
        want = decode(phi.raw(x[rows], labels[rows]).mean(0, keepdim=True)).grid[0]
        got = fn(x[:1], torch.tensor([k])).grid[0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert not torch.equal(fn(x[:1], torch.tensor([0])).grid, fn(x[:1], torch.tensor([1])).grid)


def test_override_changes_only_the_named_settings() -> None:
    base = replace(TOY, blind=replace(TOY.blind, keep="last"))  # L-BFGS follows a "last" stage only
    tb = override(base, steps=11, blind_steps=12, lbfgs_steps=3, ld3_steps=13, batch=8, train=40, val=20)
    assert (tb.phi.steps, tb.blind.steps, tb.blind.lbfgs_steps, tb.ld3.steps) == (11, 12, 3, 13)
    assert tb.phi.batch_size == tb.blind.batch_size == tb.ld3.batch_size == 8
    assert (tb.num_train, tb.num_val) == (40, 20)
    assert tb.phi.lr == TOY.phi.lr and tb.ld3.optimizer == "rmsprop"
    assert tb.blind.val_every == TOY.blind.val_every
    assert override(base) == base


def test_sample_pictures_put_teacher_gits_and_phi_side_by_side(tmp_path) -> None:
    """Row 0: the teacher on the first held-out seeds; then per NFE, GITS's grid and phi's samples."""
    image = pytest.importorskip("PIL.Image")

    def gauss(x, sigma, class_labels=None):  # the exact denoiser of N(0, 0.25) pixels
        return x * 0.25 / (0.25 + sigma.view(-1, 1, 1, 1) ** 2)

    tb = Testbed("toy-img", lambda: gauss, (1, 4, 4), 10.0, nfes=(3,), teacher=TeacherSpec("ipndm", 10),
                 dataset="digits", shard_size=8)
    heads, cache = tmp_path / "heads", str(tmp_path / "cache")
    assert sample_pictures(tb, [3], heads, cache, tmp_path) is None  # nothing saved yet
    phi = Predictor(PredictorConfig(tb.schedule(3), tb.solver, tb.shape, pool=2, backbone=tb.name))
    heads.mkdir()
    phi.save(heads / "toy-img_ipndm_nfe3_phi.safetensors")
    gits = get_sigmas("logsnr", 3, 0.002, 10.0)
    _save_grid(heads, tb, 3, "gits", Schedule(gits), {})
    path = sample_pictures(tb, [3], heads, cache, tmp_path, n=5, zoom=3)
    assert path == tmp_path / "samples_toy-img.png"
    held = tb.tuning_setup(None, 3, cache).cache().load(range(HELD_OUT, HELD_OUT + 5))
    with torch.no_grad():
        rows = [held.x0, sample(gauss, held.x_T, gits, "ipndm"), generate(phi.eval(), gauss, held, "ipndm")]
    want = image_grid(torch.cat(rows), columns=5)
    assert want.shape == (3 * 5 + 1, 5 * 5 + 1)
    pixels = np.asarray(image.open(path))
    assert (pixels == want.repeat(3, 0).repeat(3, 1)).all()
    assert sample_pictures(replace(tb, dataset=None), [3], heads, cache, tmp_path) is None  # not images


def test_exhaustive_grids_global_is_the_best_shared_grid() -> None:
    from indis.engine.tuning.teacher import TuningData

    model = toy_mixture()
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 10
    x0 = sample(model, x_T, get_sigmas("edm", 60, 0.002, 10.0), "ipndm")
    data = TuningData(torch.arange(16), x_T, None, x0)
    ex = exhaustive_grids(model, data, TOY, points=8)
    assert ex["oracle"] <= ex["global"]
    grid = torch.tensor(ex["global_grid"], dtype=torch.float64)
    again = float(sample_loss(sample(model, x_T, grid, "euler"), x0, "l2").mean())
    assert again == pytest.approx(ex["global"], rel=1e-12)
    # brute force on a 4-point table: the oracle is each sample's own best grid, averaged
    ex4 = exhaustive_grids(model, data, TOY, points=4)
    sig = torch.logspace(1, math.log10(0.002), 6, dtype=torch.float64)[1:-1]
    grids = [torch.stack([sig.new_tensor(10.0), sig[i], sig[j], sig.new_tensor(0.002)])
             for i in range(4) for j in range(i + 1, 4)]
    losses = torch.stack([sample_loss(sample(model, x_T, g, "euler"), x0, "l2") for g in grids])
    assert ex4["oracle"] == pytest.approx(float(losses.min(0).values.mean()), rel=1e-12)
    assert ex4["global"] == pytest.approx(float(losses.mean(1).min()), rel=1e-12)


def test_report_and_plots(toy_cell, tmp_path) -> None:
    record, _ = toy_cell
    text = markdown([record])
    assert "| toy | 3 | 24 |" in text and "INDIS phi" in text and "Per-instance oracles" in text
    best = record["rows"][record["best_global"]]
    assert f"(± {100 * best['se_vs_phi'] / best['mse']:.2g} % paired s.e.)" in text
    rows = record["rows"]
    phi = rows["INDIS phi"]["mse"]
    versus = [f"{100 * (phi / rows[m]['mse'] - 1):+.1f} %" if m in rows else "–"
              for m in (GITS_ROW, "LD3-global", AYS_ROW)]
    assert "LD3-global" in rows and AYS_ROW in rows
    assert f"| toy | 3 | {phi:.4g} | {' | '.join(versus)} |" in text  # the published-schedules table
    pytest.importorskip("matplotlib")
    written = plots([record, replace_nfe(record, 5)], tmp_path)
    assert {p.name for p in written} == {"quality_vs_nfe.png", "grid_fan_toy.png"}
    assert all(p.stat().st_size > 1000 for p in written)


def replace_nfe(record: dict, nfe: int) -> dict:
    return {**record, "nfe": nfe}


def test_staged_conditional_phi_starts_from_the_tuned_blind_head() -> None:
    """A conditional blind head learns per-class schedules; phi starts from all of it, not just its base."""

    def model(x, sigma, class_labels=None):
        s2 = sigma.view(-1, 1) ** 2
        mu = torch.where(class_labels.view(-1, 1) == 1, 1.0, -1.0).to(x.dtype)
        return (x + mu * s2) / (1 + s2)

    from indis.engine.tuning.teacher import TuningData

    n = 32
    labels = torch.arange(n) % 2
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0)) * 10
    x0 = sample(model, x_T, get_sigmas("edm", 40, 0.002, 10.0), "ipndm", cond={"class_labels": labels})
    data = TuningData(torch.arange(n), x_T, labels, x0)
    phi = fit_predictor(model, nfe=3, solver="euler", shape=(2,), sigma_min=0.002, sigma_max=10.0,
                        num_classes=2, data=(data, data), fit_config=FitConfig(steps=0, progress=False),
                        blind_config=FitConfig(steps=20, lr=0.01, batch_size=n, val_every=5, progress=False))
    assert isinstance(phi.blind, Predictor) and phi.blind.out is not None
    assert phi.fit_results[0].best_val < phi.fit_results[0].init_val  # the blind stage did move
    a, b = phi(x_T, labels), phi.blind(x_T, labels)
    torch.testing.assert_close(a.grid, b.grid, rtol=0, atol=0)
    torch.testing.assert_close(a.shift, b.shift, rtol=0, atol=0)
    assert not torch.equal(b.grid[0], b.grid[1])  # the blind head's schedule does depend on the class


def test_report_warns_about_cells_tuned_under_other_settings(tmp_path, capsys) -> None:
    """A cell records the optimiser settings that tuned it; reusing one made under other (or unrecorded)
    settings says so instead of passing it off as the current defaults' result."""
    from indis.engine.studies.quality import TESTBEDS, fit_configs, main

    committed = json.loads((ROOT / "benchmarks/results/quality/cells/tree_nfe3.json")
                           .read_text())
    (tmp_path / "cells").mkdir()
    cell = tmp_path / "cells" / "tree_nfe3.json"
    args = ["--testbeds", "tree", "--report-only", "--out", str(tmp_path), "--cache", str(tmp_path / "c")]
    current = fit_configs(TESTBEDS["tree"]())
    for recorded, warned in ((None, "unrecorded"), ({**current, "blind": {**current["blind"], "steps": 7}},
                                                    "other"), (current, None)):
        record = {k: v for k, v in committed.items() if k != "fit_configs"}
        if recorded is not None:
            record["fit_configs"] = recorded
        cell.write_text(json.dumps(record))
        main(args)
        out = capsys.readouterr().out
        assert ("WARNING" in out) == (warned is not None)
        if warned:
            assert f"tuned under {warned} optimiser settings" in out
    main([*args, "--train", "7"])  # fewer tuning seeds than the cell was tuned on
    warning = f"was tuned on {committed['train']} + {committed['val']} seeds, not 7 + "
    assert warning in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--samples", "1"], ["--nfe", "0"], ["--batch", "0"], ["--steps", "-1"],
                                 ["--train", str(1 << 20)], ["--ship", "x", "--testbeds", "tree"]])
def test_quality_command_refuses_bad_settings(bad, tmp_path, capsys) -> None:
    from indis.engine.studies.quality import main

    with pytest.raises(SystemExit) as e:
        main([*bad, "--report-only", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "--" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before writing anything
