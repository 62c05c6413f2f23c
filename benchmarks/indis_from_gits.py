"""INDIS started from the GITS grid: does phi help on top of the best grid dynamic programming finds?

    python benchmarks/indis_from_gits.py [--backbone unet] [--nfe 3 5] [--steps 300] [--samples 1024]

The quality tables start every tuned head from EDM rho=7, and GITS (dynamic programming over a fine grid)
beats all of them on the digits backbones. Here the blind head starts from the GITS grid (Δτ = 0, γ = 1) and
is tuned for ``--steps``; phi starts from it and is tuned for ``--steps`` more; the control is the blind head
tuned for the same extra steps; phi's mean schedule is phi's raw output averaged over the tuning seeds' x_T.
Teacher MSE on held-out seeds [2^20, 2^20 + samples).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import replace

import torch

from indis.engine.predictor import Predictor, PredictorConfig
from indis.engine.quality import TESTBEDS, Bench, generate, mean_schedule
from indis.engine.sampling import sample
from indis.engine.teacher import TuningData
from indis.engine.tuning import FitConfig, evaluate, fit, fit_gits, phi_from_blind, sample_loss


def _tune(name: str, head: Predictor, cfg: FitConfig, model: torch.nn.Module, train: TuningData,
          val: TuningData, held: TuningData, solver: str) -> None:
    r = fit(head, model, train, val, solver, cfg)
    mse = float(evaluate(head.eval(), model, held, solver).mean())
    print(f"  {name:34s} held-out {mse:.5f}   ({r.wall_s:.0f} s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", choices=("unet", "dit"), default="unet")
    p.add_argument("--nfe", type=int, nargs="+", default=[3, 5])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--cache", default=".indis-cache/teacher")
    a = p.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    tb = TESTBEDS[f"digits-{a.backbone}"]()
    for nfe in a.nfe:
        sc = tb.schedule(nfe)
        bench = Bench(tb, nfe, samples=a.samples, cache_dir=a.cache, progress=False)
        model, held = bench.model, bench.held
        train, val = bench.setup.data(progress=False)
        gits = fit_gits(model, train.x_T[:256], nfe=nfe, sigma_min=tb.sigma_min, sigma_max=tb.sigma_max,
                        labels=None if train.labels is None else train.labels[:256])
        cond = None if held.labels is None else {"class_labels": held.labels}
        gits_x = sample(model, held.x_T, gits, tb.solver, cond=cond)
        gits_mse = float(sample_loss(gits_x, held.x0, "l2").mean())
        print(f"{tb.name}, {tb.solver}, NFE {nfe}, {len(held)} held-out seeds; GITS grid "
              f"{[round(float(s), 4) for s in gits]}")
        print(f"  {'GITS':34s} held-out {gits_mse:.5f}", flush=True)
        cfg = replace(tb.phi, steps=a.steps)
        pc = PredictorConfig(sc, tb.solver, tb.shape, backbone=tb.name, pool=tb.pool,
                             num_classes=tb.num_classes)
        blind = Predictor(replace(pc, blind=True), base=sc.raw_from_grid(gits))
        data = (model, train, val, held, tb.solver)
        _tune("blind from GITS", blind, replace(cfg, lr=1e-2), *data)
        control, phi = copy.deepcopy(blind), phi_from_blind(pc, blind)
        _tune("control: blind continued", control, cfg, *data)
        _tune("INDIS phi from it", phi, cfg, *data)
        fn = mean_schedule(phi, train.x_T, train.labels)
        mse = float(sample_loss(generate(fn, model, held, tb.solver), held.x0, "l2").mean())
        print(f"  {'phi mean schedule (global)':34s} held-out {mse:.5f}", flush=True)

if __name__ == "__main__":
    main()
