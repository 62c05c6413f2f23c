"""What makes phi generalise: train vs held-out teacher MSE of phi variants on a shipped digits backbone.

    python benchmarks/indis_generalisation.py [--backbone unet] [--nfe 3] [--steps 300] [--samples 1024]

The blind schedule is tuned once (phi's first stage); every variant then starts from it and is tuned with the
same optimiser steps, except "unstaged", which starts from the EDM heuristic. The control is the blind head
tuned for the same extra steps (phi keeps tuning the global part too, so this is what phi must beat).
Variants change one thing at a time against the default recipe (pool 2, hidden 128, 1024 training seeds, no
weight decay, early stopping):
the noise input (raw 64-d, mean only, 2x2, 4x4 pooled), weight decay, capacity, data size (256 seeds, and 4x
the 1024 seeds -- the extra seeds follow the validation range), early stopping, staging. Held-out seeds
[2^20, 2^20 + samples); train MSE on the first ``samples`` training seeds. Last, the headroom: a per-instance
oracle (phi's Δτ/γ capacity, Adam from the control's schedule) on the first ``--oracle-samples`` held-out
seeds, against the control on the same seeds.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace

import torch

from indis.engine.predictor import PredictorConfig
from indis.engine.quality import TESTBEDS, Bench
from indis.engine.teacher import TuningData
from indis.engine.tuning import (
    FitConfig,
    evaluate,
    fit,
    fit_oracle,
    fit_predictor,
    phi_from_blind,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", choices=("unet", "dit"), default="unet")
    p.add_argument("--nfe", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--oracle-samples", type=int, default=128)
    p.add_argument("--oracle-steps", type=int, default=200)
    p.add_argument("--cache", default=".indis-cache/teacher")
    a = p.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    tb = TESTBEDS[f"digits-{a.backbone}"]()
    bench = Bench(tb, a.nfe, samples=a.samples, cache_dir=a.cache, progress=False)
    model, setup, held = bench.model, bench.setup, bench.held
    train, val = setup.data(progress=False)
    train_eval = train.subset(torch.arange(min(a.samples, len(train))))
    extra_seeds = range(len(train) + len(val), len(train) + len(val) + 3 * len(train))  # after validation
    setup.cache().build(model, extra_seeds, progress=False)
    extra = setup.cache().load(extra_seeds)
    big = TuningData(torch.cat([train.seeds, extra.seeds]), torch.cat([train.x_T, extra.x_T]),
                     None if train.labels is None else torch.cat([train.labels, extra.labels]),
                     torch.cat([train.x0, extra.x0]))
    cfg = replace(tb.phi, steps=a.steps)
    common = dict(nfe=a.nfe, solver=tb.solver, shape=tb.shape, sigma_min=tb.sigma_min, sigma_max=tb.sigma_max,
                  num_classes=tb.num_classes, backbone=tb.name)
    t = time.perf_counter()
    blind = fit_predictor(model, **common, data=(train, val), fit_config=replace(cfg, steps=0),
                          blind_config=replace(cfg, lr=1e-2)).blind
    print(f"{tb.name}, {tb.solver}, NFE {a.nfe}, {a.steps} steps per variant, {len(held)} held-out seeds "
          f"(blind stage {time.perf_counter() - t:.0f} s)")

    def report(name: str, head: torch.nn.Module, wall: float = 0.0) -> float:
        held_mse = float(evaluate(head, model, held, tb.solver).mean())
        train_mse = float(evaluate(head, model, train_eval, tb.solver).mean())
        print(f"  {name:34s} train {train_mse:.5f}   held-out {held_mse:.5f}   ({wall:.0f} s)", flush=True)
        return held_mse

    report("blind (start of every variant)", blind)
    control = copy.deepcopy(blind)
    report("blind continued (the control)", control, fit(control, model, train, val, tb.solver, cfg).wall_s)
    variants = [
        ("pool 2 (default)", {}, {}, None),
        ("raw noise (64-d, no pooling)", {"pool": None}, {}, None),
        ("mean only (pool 1)", {"pool": 1}, {}, None),
        ("pool 4", {"pool": 4}, {}, None),
        ("pool 2, weight decay 1e-2", {}, {"weight_decay": 1e-2}, None),
        ("pool 2, hidden 32", {"hidden": 32}, {}, None),
        ("pool 2, 256 training seeds", {}, {}, 256),
        ("pool 2, 4x training seeds", {}, {}, "4x"),
        ("raw noise, 4x training seeds", {"pool": None}, {}, "4x"),
        ("pool 2, no early stopping", {}, {"patience": 10**9}, None),
        ("pool 2, unstaged (from EDM)", {}, {}, None),
    ]
    for name, pc_kw, cfg_kw, num_train in variants:
        pc = PredictorConfig(tb.schedule(a.nfe), tb.solver, tb.shape, backbone=tb.name,
                             num_classes=tb.num_classes, **{"pool": 2, **pc_kw})
        head = phi_from_blind(pc, None if "unstaged" in name else blind)
        data = {None: train, "4x": big}.get(num_train) or train.subset(torch.arange(num_train))
        result = fit(head, model, data, val, tb.solver, replace(cfg, **cfg_kw))
        report(name, head.eval(), result.wall_s)
    # the headroom: schedules fitted per held-out sample (phi's capacity), from the blind schedule
    sub = held.subset(torch.arange(a.oracle_samples))
    oracle_cfg = FitConfig(steps=a.oracle_steps, batch_size=len(sub), lr=0.05, clip=None, patience=10**9,
                           progress=False)
    oracle = fit_oracle(model, sub, control.config, oracle_cfg, base=control.base)
    blind_sub = float(evaluate(control, model, sub, tb.solver).mean())
    oracle_sub = float(evaluate(oracle, model, sub, tb.solver, per_instance=True).mean())
    print(f"  per-instance oracle on the first {len(sub)} held-out seeds: {oracle_sub:.5f} vs the control "
          f"{blind_sub:.5f} ({100 * (oracle_sub / blind_sub - 1):+.1f} %, {oracle.fit_result.wall_s:.0f} s)")


if __name__ == "__main__":
    main()
