"""Wall time of one INDIS head with ``fit_predictor``'s defaults: the digits UNet at NFE 5 (iPNDM).

    python benchmarks/bench_tuning_cost.py [--nfe 5] [--threads 2]
        [--out benchmarks/results/quality/tuning_cost.md]

From an empty teacher cache (a temporary directory): the teacher end points of the 1024 + 512 tuning seeds,
the start grid (GITS and the heuristics), the blind stage, phi's stage and the shrink toward its mean, all
as ``indis fit`` runs them. Prints each part's share and the total; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from indis.engine.testbeds.digits import load_backbone
from indis.engine.tuning.fit import FitResult, fit_predictor


def stage_steps(r: FitResult) -> str:
    """The optimiser steps one stage ran: its Adam steps, and its L-BFGS evaluations if it finished so."""
    lbfgs = [h["lbfgs_evaluations"] for h in r.history if "lbfgs_evaluations" in h]
    adam = f"{len(r.history) - len(lbfgs)} steps"
    return adam + (f" + L-BFGS, {lbfgs[0]} evaluations" if lbfgs else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nfe", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/quality/tuning_cost.md")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_backbone("unet")
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        phi = fit_predictor(model, nfe=a.nfe, solver="ipndm", shape=(1, 8, 8), sigma_min=0.002,
                            sigma_max=80.0, backbone="digits-unet", pool=2, cache_dir=cache)
        total = time.perf_counter() - t0
    blind, stage = phi.fit_results
    rest = total - blind.wall_s - stage.wall_s
    lines = [f"## Tuning cost: one digits-UNet head, NFE {a.nfe}, iPNDM, fit_predictor defaults",
             "", f"{platform.processor() or platform.machine()}, {a.threads} torch threads, torch "
             f"{torch.__version__}", "",
             "| part | wall s |", "|---|---|",
             f"| teacher (1536 seeds, 30-step iPNDM), start grid (GITS + heuristics), shrink | {rest:.0f} |",
             *(f"| {name} stage ({stage_steps(r)}, kept step {r.best_step}) | {r.wall_s:.0f} |"
               for name, r in (("blind", blind), ("phi", stage))),
             f"| **total** | **{total:.0f}** ({total / 60:.1f} min) |", "",
             f"Start: {phi.start['chosen']}; shrink factor {phi.start['shrink']:g}."]
    text = "\n".join(lines) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
