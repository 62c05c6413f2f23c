"""Convergence curves of INDIS tuning: validation loss vs optimiser step for the blind stage and phi's stage.

    python benchmarks/indis_convergence.py [--testbed digits-unet] [--nfe 3 5 7] [--steps 800]
        [--blind-lr 3e-2 1e-2 3e-3] [--phi-lr 1e-3 3e-4] [--out benchmarks/results/quality/convergence]

The committed curves: ``--testbed digits-unet`` and ``--testbed mixture16`` with these defaults.

Every run starts where ``fit_predictor`` starts by default (``tuning.start_grid``: the best of GITS and the
four heuristics on the tuning seeds). The blind head (grid + Δτ + γ) is tuned for ``--steps`` at each blind
learning rate; from the best of them phi is tuned for ``--steps`` at each phi learning rate, beside the
control (the blind head continued with phi's settings). Patience is off, so each curve runs its whole
budget; validation (teacher MSE on the validation seeds, which are tuning seeds) every 25 steps. Held-out
seeds are never touched: these curves choose ``tuning.PHI_FIT`` (the blind stage's ``tuning.BLIND_FIT``
comes from ``benchmarks/indis_blind_stage.py``). Testbeds: the digits
backbones (``digits-unet``, ``digits-dit``) and ``mixture16`` (``testbeds.random_mixture(seed=0)``, 16-D,
Euler, exact teacher). Writes ``<testbed>.json`` (every history), ``<testbed>.png`` and ``<testbed>.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from indis.engine.core.predictor import Predictor, PredictorConfig
from indis.engine.studies.quality import TESTBEDS, Testbed, mixture_testbed
from indis.engine.tuning.fit import FitConfig, fit, phi_from_blind, start_grid


def _curve(result) -> list[tuple[int, float]]:
    return [(r["step"], r["val"]) for r in result.history if "val" in r]


def _settle(curve: list[tuple[int, float]], tol: float = 0.01) -> int:
    """First validation step within ``tol`` (relative) of the curve's best."""
    best = min(v for _, v in curve)
    return next(s for s, v in curve if v <= best * (1 + tol))


def run(tb: Testbed, nfe: int, steps: int, blind_lrs: list[float], phi_lrs: list[float], num_val: int,
        cache: str) -> dict:
    model = tb.load()
    setup = replace(tb, num_val=num_val).tuning_setup(model, nfe, cache)
    train, val = setup.data(progress=False)
    sc = setup.schedule
    grid, start = start_grid(model, train, sc, tb.solver)
    scores = [round(v, 5) for v in start["candidates"].values()]
    print(f"{tb.name} NFE {nfe}: start {start['chosen']} {scores}", flush=True)
    pc = PredictorConfig(sc, tb.solver, tb.shape, backbone=tb.name, pool=tb.pool, num_classes=tb.num_classes)
    base = sc.raw_from_grid(grid)
    out: dict = {"nfe": nfe, "start": start, "runs": {}}

    def cfg(lr: float) -> FitConfig:
        return FitConfig(steps=steps, batch_size=64, lr=lr, patience=10**9, val_every=25, progress=False)

    blinds = {}
    for lr in blind_lrs:
        head = Predictor(replace(pc, blind=True), base=base)
        r = fit(head, model, train, val, tb.solver, cfg(lr))
        blinds[lr] = (head, r)
        out["runs"][f"blind lr {lr:g}"] = {"curve": _curve(r), "init": r.init_val, "wall_s": r.wall_s}
        print(f"  blind lr {lr:g}: {r.init_val:.5g} -> {r.best_val:.5g} at step {r.best_step} "
              f"({r.wall_s:.0f} s)", flush=True)
    best_lr = min(blinds, key=lambda k: blinds[k][1].best_val)
    blind = blinds[best_lr][0]
    out["phi_from"] = f"blind lr {best_lr:g}"
    for lr in phi_lrs:
        for name, head in (("phi", phi_from_blind(pc, blind)), ("control (blind continued)",
                                                                copy.deepcopy(blind))):
            r = fit(head, model, train, val, tb.solver, cfg(lr))
            out["runs"][f"{name} lr {lr:g}"] = {"curve": _curve(r), "init": r.init_val, "wall_s": r.wall_s}
            print(f"  {name} lr {lr:g}: {r.init_val:.5g} -> {r.best_val:.5g} at step {r.best_step} "
                  f"({r.wall_s:.0f} s)", flush=True)
    return out


def markdown(name: str, cells: list[dict], steps: int, num_val: int) -> str:
    lines = [f"## Tuning convergence: {name} ({steps} steps per run, batch 64, cosine LR, validation teacher "
             f"MSE on {num_val} tuning seeds every 25 steps)", "",
             "| NFE | start | run | initial | best | best step | first step within 1 % of best "
             "| s per step |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        for run_name, r in c["runs"].items():
            curve = [tuple(p) for p in r["curve"]]
            best_step, best = min(curve, key=lambda p: p[1])
            lines.append(f"| {c['nfe']} | {c['start']['chosen']} | {run_name} | {r['init']:.5g} | "
                         f"{best:.5g} | {best_step} | {_settle(curve)} | {r['wall_s'] / steps:.3f} |")
    return "\n".join(lines) + "\n"


def plot(name: str, cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells), figsize=(4.8 * len(cells), 3.8), squeeze=False)
    for ax, c in zip(axes[0], cells, strict=True):
        for run_name, r in c["runs"].items():
            steps, vals = zip(*r["curve"], strict=True)
            ax.plot((0, *steps), (r["init"], *vals), label=run_name, lw=1.2)
        ax.set(title=f"{name}, NFE {c['nfe']}", xlabel="optimiser step", ylabel="validation teacher MSE",
               yscale="log")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--testbed", default="digits-unet", choices=("digits-unet", "digits-dit", "mixture16"))
    p.add_argument("--nfe", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--blind-lr", type=float, nargs="+", default=[3e-2, 1e-2, 3e-3])
    p.add_argument("--phi-lr", type=float, nargs="+", default=[1e-3, 3e-4])
    p.add_argument("--num-val", type=int, default=1024, help="validation seeds (tuning seeds after train)")
    p.add_argument("--cache", default=".indis-cache/teacher")
    p.add_argument("--out", default="benchmarks/results/quality/convergence")
    a = p.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    tb = mixture_testbed(0) if a.testbed == "mixture16" else TESTBEDS[a.testbed]()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cells = [run(tb, nfe, a.steps, a.blind_lr, a.phi_lr, a.num_val, a.cache) for nfe in a.nfe or tb.nfes]
    record = {"testbed": tb.name, "steps": a.steps, "num_val": a.num_val, "threads": torch.get_num_threads(),
              "wall_s": time.perf_counter() - t0, "cells": cells}
    (out / f"{tb.name}.json").write_text(json.dumps(record, indent=1))
    text = markdown(tb.name, cells, a.steps, a.num_val)
    (out / f"{tb.name}.md").write_text(text)
    plot(tb.name, cells, out / f"{tb.name}.png")
    print(text)


if __name__ == "__main__":
    main()
