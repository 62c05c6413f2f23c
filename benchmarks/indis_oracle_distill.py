"""Are per-instance oracle schedules a learnable function of x_T? Distil them into phi and measure.

    python benchmarks/indis_oracle_distill.py [--backbone unet] [--nfe 3] [--oracle-seeds 512]

Tunes the blind schedule (phi's first stage, 300 steps), fits a per-instance oracle (phi's Δτ/γ capacity,
Adam from the blind schedule) on the first ``--oracle-seeds`` tuning seeds, then trains phi (raw 8x8 noise or
2x2-pooled) by plain regression onto the oracle's raw outputs -- no backbone in that loop. Prints the teacher
MSE of the blind schedule, the oracle and the distilled phi on those training seeds and on held-out seeds
[2^20, 2^20 + --samples): if distillation keeps the oracle's gain on training seeds but loses it on held-out
ones, the oracle's schedules are not predictable from x_T with this much data.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from indis.engine.predictor import PredictorConfig
from indis.engine.quality import TESTBEDS, Bench
from indis.engine.tuning import FitConfig, evaluate, fit_oracle, fit_predictor, phi_from_blind


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", choices=("unet", "dit"), default="unet")
    p.add_argument("--nfe", type=int, default=3)
    p.add_argument("--oracle-seeds", type=int, default=512)
    p.add_argument("--oracle-steps", type=int, default=200)
    p.add_argument("--distill-steps", type=int, default=3000)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--cache", default=".indis-cache/teacher")
    a = p.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    tb = TESTBEDS[f"digits-{a.backbone}"]()
    bench = Bench(tb, a.nfe, samples=a.samples, cache_dir=a.cache, progress=False)
    model, held = bench.model, bench.held
    train, val = bench.setup.data(progress=False)
    cfg = replace(tb.phi, steps=300)
    common = dict(nfe=a.nfe, solver=tb.solver, shape=tb.shape, sigma_min=tb.sigma_min, sigma_max=tb.sigma_max,
                  num_classes=tb.num_classes, backbone=tb.name, data=(train, val))
    blind = fit_predictor(model, **common, fit_config=replace(cfg, steps=0),
                          blind_config=replace(cfg, lr=1e-2)).blind
    sub = train.subset(torch.arange(a.oracle_seeds))
    t = time.perf_counter()
    oracle_cfg = FitConfig(steps=a.oracle_steps, batch_size=len(sub), lr=0.05, clip=None, patience=10**9,
                           progress=False)
    oracle = fit_oracle(model, sub, blind.config, oracle_cfg, base=blind.base)
    index = torch.arange(len(sub))
    with torch.no_grad():
        target = oracle.raw(sub.x_T, sub.labels, index)
    print(f"{tb.name}, {tb.solver}, NFE {a.nfe}: oracle on {len(sub)} tuning seeds "
          f"({time.perf_counter() - t:.0f} s); teacher MSE on those seeds / on {len(held)} held-out seeds")

    def report(name: str, head: torch.nn.Module, per_instance: bool = False) -> None:
        tr = float(evaluate(head, model, sub, tb.solver, per_instance=per_instance).mean())
        ho = "n/a" if per_instance else f"{float(evaluate(head, model, held, tb.solver).mean()):.5f}"
        print(f"  {name:36s} train {tr:.5f}   held-out {ho}", flush=True)

    report("blind", blind)
    report("per-instance oracle", oracle, per_instance=True)
    for pool in (None, 2):
        pc = PredictorConfig(tb.schedule(a.nfe), tb.solver, tb.shape, backbone=tb.name, pool=pool,
                             num_classes=tb.num_classes)
        phi = phi_from_blind(pc, blind)
        opt = torch.optim.Adam(phi.parameters(), lr=1e-3)
        for _ in range(a.distill_steps):
            loss = (phi.raw(sub.x_T, sub.labels) - target).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        report(f"phi distilled from the oracle (pool {pool})", phi.eval())


if __name__ == "__main__":
    main()
