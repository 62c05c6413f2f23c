"""The README's main command: INDIS on a shipped backbone at NFE 3/5/7 against the best global schedules.

    python -m indis.engine.studies.demo [--testbed digits-unet|fashion-unet] [--samples 512] [--nfe 3 5 7]
                                        [--out indis-demo]

``--testbed``: the digits UNet (8x8, unconditional; the default) or the Fashion-MNIST UNet (28x28,
class-conditional: phi reads the label; several minutes on 2 CPU threads). Loads the shipped schedule heads
(``engine/weights/indis``: phi, its blind ablation, phi without shift/scale and LD3-global, tuned by
``python -m indis.engine.studies.quality --testbeds <testbed> ... --ship engine/weights/indis``); where a head
set is missing it tunes one on the spot with ``--fit-steps`` optimiser steps per stage. It also computes
phi's mean schedule and the GITS grid (dynamic programming). Every method then samples the same held-out
seeds; the demo prints teacher MSE / PSNR and the Fréchet distances (the backbone's classifier features) to
the 30-step iPNDM teacher and to the data, writes the plots and the table to ``--out`` and ends with a
verdict per NFE: whether INDIS phi beats every global schedule, phi against the published tuned schedules
(GITS, LD3-global) with the FD to data beside GITS's, and the global schedules ranked.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from indis.engine.core.schedules import Schedule
from indis.engine.studies.quality import (
    GITS_ROW,
    MEAN_ROW,
    NOSS_ROW,
    TESTBEDS,
    Bench,
    _fixed,
    blind_ablation,
    load_heads,
    markdown,
    mean_schedule,
    plots,
)
from indis.engine.testbeds.digits import SHIPPED_HEADS
from indis.engine.tuning.fit import fit_gits, fit_global, fit_predictor

DEMO_TESTBEDS = ("digits-unet", "fashion-unet")  # the shipped backbones with shipped heads


def _tune(bench: Bench, steps: int) -> dict:
    """Quick heads for a missing NFE (same recipe as the quality command, ``steps`` per stage)."""
    tb, nfe = bench.tb, bench.nfe
    bench.log(f"no shipped heads: tuning phi, its blind ablation and LD3 ({steps} steps per stage)")
    data = bench.setup.data()
    common = dict(nfe=nfe, solver=tb.solver, shape=tb.shape, sigma_min=tb.sigma_min, sigma_max=tb.sigma_max,
                  num_classes=tb.num_classes, backbone=tb.name, data=data)
    phi_cfg, blind_cfg = replace(tb.phi, steps=steps), replace(tb.blind, steps=steps)
    phi = fit_predictor(bench.model, **common, pool=tb.pool, fit_config=phi_cfg, blind_config=blind_cfg)
    noss = fit_predictor(bench.model, **common, pool=tb.pool, fit_config=phi_cfg, blind_config=blind_cfg,
                         shift_bound=0.0, scale_bound=0.0)
    ld3 = fit_global(bench.model, **common, fit_config=replace(tb.ld3, steps=steps, progress=True))
    blind, _ = blind_ablation(phi, bench.model, data, replace(tb, phi=phi_cfg))
    return {"phi": phi, "blind": blind, "phi_noss": noss, "ld3": _fixed(ld3)}


def verdict(record: dict) -> str:
    """One plain line: does INDIS phi beat every global schedule of the cell on held-out teacher MSE?"""
    rows = record["rows"]
    glob = sorted((r["mse"], name) for name, r in rows.items() if r["kind"] == "global")
    best_mse, best = glob[0]
    phi = rows["INDIS phi"]["mse"]
    ranking = ", ".join(f"{name} {mse:.4g}" for mse, name in glob)
    se = rows[best].get("se_vs_phi")
    outcome = "WINS" if phi < best_mse else "LOSES"
    if se is not None and abs(phi - best_mse) <= 2 * se:
        outcome = "TIES (within 2 paired s.e.)"
    gap = f"{100 * (phi / best_mse - 1):+.1f} %" + ("" if se is None else f" ± {100 * se / best_mse:.2g} %")
    head = (f"NFE {record['nfe']}: INDIS phi {outcome}: teacher MSE {phi:.4g}, "
            f"{gap} against the best global schedule ({best}, {best_mse:.4g})")
    published = [f"{name} {100 * (phi / rows[name]['mse'] - 1):+.1f} %" for name in (GITS_ROW, "LD3-global")
                 if name in rows]
    if published:
        head += "; against the published tuned schedules: " + ", ".join(published)
        fd = rows["INDIS phi"].get("fd_data"), rows.get(GITS_ROW, {}).get("fd_data")
        if None not in fd:
            head += f" (FD to data {fd[0]:.4g} vs GITS {fd[1]:.4g})"
    return f"{head}. Global schedules, best first: {ranking}."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m indis.engine.studies.demo",
                                description=__doc__.splitlines()[0])
    p.add_argument("--testbed", choices=DEMO_TESTBEDS, default=DEMO_TESTBEDS[0], help="the backbone")
    p.add_argument("--samples", type=int, default=512, help="held-out seeds per NFE")
    p.add_argument("--nfe", type=int, nargs="+", default=[3, 5, 7])
    p.add_argument("--heads", default=str(SHIPPED_HEADS), help="directory of tuned heads")
    p.add_argument("--fit-steps", type=int, default=100, help="steps per stage when a head set is missing")
    p.add_argument("--out", default="indis-demo")
    p.add_argument("--cache", default=".indis-cache/teacher")
    a = p.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    tb, out = TESTBEDS[a.testbed](), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"INDIS demo: {tb.name}, {tb.solver}, NFE {a.nfe}, {a.samples} held-out seeds; teacher "
          f"{tb.teacher.solver} {tb.teacher.steps} steps")
    records = []
    for nfe in a.nfe:
        bench = Bench(tb, nfe, samples=a.samples, cache_dir=a.cache)
        heads = load_heads(Path(a.heads), tb, nfe)
        source = f"shipped ({a.heads})"
        if heads is None:
            heads, source = _tune(bench, a.fit_steps), f"tuned now, {a.fit_steps} steps per stage"
        bench.heuristics()
        bench.measure("LD3-global", heads["ld3"], "global")
        bench.measure("phi blind (ablation)", heads["blind"], "global")
        bench.measure("INDIS phi", heads["phi"], "indis")
        bench.measure(NOSS_ROW, heads["phi_noss"], "ablation")
        x_T, labels = bench.setup.cache().inputs(torch.arange(tb.num_train))  # the tuning seeds' noise
        bench.measure(MEAN_ROW, mean_schedule(heads["phi"], x_T, labels), "global")
        gits = fit_gits(bench.model, x_T[:256], nfe=nfe, sigma_min=tb.sigma_min, sigma_max=tb.sigma_max,
                        labels=None if labels is None else labels[:256])
        bench.measure(GITS_ROW, _fixed(Schedule(gits)), "global")
        records.append(bench.record(heads=source))
    text = markdown(records)
    (out / "quality.md").write_text(text)
    print(text)
    for f in plots(records, out):
        print(f"wrote {f}")
    print("\n".join(["", "Verdict (held-out teacher MSE; global schedules: the heuristics, AYS, LD3-global, "
                      "GITS, phi's blind ablation and phi's own mean schedule):", *map(verdict, records)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
