"""Quick INDIS check on the shipped digits UNet: held-out teacher MSE of a heuristic, LD3-global, phi's blind
ablation and phi at one NFE (a first step towards the full quality table of issue 3; no FD, no plots).

    python benchmarks/indis_digits_quick.py --nfe 5 --solver ipndm [--pool 2] [--steps 150]

Teacher: 30-step iPNDM of the same UNet (cached under --cache). Tuning seeds [0, 1280) (1024 train, 256
validation), evaluation on held-out seeds [2^20, 2^20 + --samples). LD3 here draws its 50-sample batches
from the same 1024 training seeds (not LD3's fixed 50), with the soft teacher and RMSprop(0.005).
"""

from __future__ import annotations

import argparse
import time

import torch

from indis.engine.digits import load_backbone
from indis.engine.predictor import Predictor, PredictorConfig, ScheduleConfig
from indis.engine.sampling import sample
from indis.engine.tuning import FitConfig, TuningSetup, evaluate, fit_global, fit_predictor, sample_loss

HELD_OUT = 1 << 20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nfe", type=int, default=5)
    p.add_argument("--solver", default="ipndm")
    p.add_argument("--pool", type=int, default=None)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--cache", default=".indis-cache/teacher")
    a = p.parse_args()
    torch.set_num_threads(2)
    model = load_backbone("unet")
    shape, sc = (1, 8, 8), ScheduleConfig(a.nfe, 0.002, 80.0)
    setup = TuningSetup(model, sc, a.solver, shape, "digits-unet", cache_dir=a.cache)
    data = setup.data(progress=False)
    cache, held = setup.cache(), range(HELD_OUT, HELD_OUT + a.samples)
    cache.build(model, held, progress=False)
    test = cache.load(held)
    common = dict(nfe=a.nfe, solver=a.solver, shape=shape, sigma_min=0.002, sigma_max=80.0, data=data)
    print(f"digits UNet, {a.solver}, NFE {a.nfe}, {a.samples} held-out seeds; teacher MSE (lower is better)")
    for init in ("edm", "logsnr"):
        head = Predictor(PredictorConfig(ScheduleConfig(a.nfe, 0.002, 80.0, init=init), a.solver, shape,
                                         blind=True))
        print(f"  heuristic {init:8s} {float(evaluate(head, model, test, a.solver).mean()):.5f}")
    t = time.perf_counter()
    ld3 = fit_global(model, **common, fit_config=FitConfig(steps=a.steps, batch_size=50, lr=0.005,
                                                         optimizer="rmsprop", soft_teacher=True, clip=None,
                                                         patience=10**9, progress=False))
    with torch.no_grad():
        mse = float(sample_loss(sample(model, test.x_T, ld3, a.solver), test.x0, "l2").mean())
    print(f"  LD3-global         {mse:.5f}   ({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    cfg = FitConfig(steps=a.steps, batch_size=64, lr=1e-3, val_every=20, progress=False)
    phi = fit_predictor(model, **common, pool=a.pool, fit_config=cfg,
                        blind_config=FitConfig(**{**cfg.__dict__, "lr": 1e-2}))
    wall = time.perf_counter() - t
    train = data[0].subset(torch.arange(256))
    for name, head in (("phi blind", phi.blind), (f"phi (pool={a.pool})", phi)):
        held_mse = float(evaluate(head, model, test, a.solver).mean())
        train_mse = float(evaluate(head, model, train, a.solver).mean())
        print(f"  {name:18s} {held_mse:.5f}   (train {train_mse:.5f})")
    print(f"  tuning wall time (blind + phi, {a.steps} + {a.steps} steps, batch 64): {wall:.0f} s")


if __name__ == "__main__":
    main()
