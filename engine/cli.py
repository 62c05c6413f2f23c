"""``indis`` command line: tune an INDIS predictor for a shipped digits backbone and evaluate it.

``indis fit --backbone unet --nfe 5 --solver ipndm --out phi.safetensors`` tunes phi (staged from its blind
schedule) with teacher end points cached under ``--cache``; ``indis eval phi.safetensors`` compares it with
the heuristic grids on held-out seeds (teacher MSE / PSNR). Both call the library functions
(``indis.fit_predictor``, ``indis.engine.tuning.evaluate``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import torch

HELD_OUT = 1 << 20  # first held-out seed: never used for tuning (train/val seeds start at 0)


def _fit(args: argparse.Namespace) -> None:
    from .digits import load_backbone
    from .tuning import FitConfig, fit_predictor

    model = load_backbone(args.backbone)
    phi = fit_predictor(model, nfe=args.nfe, solver=args.solver, shape=(1, 8, 8), sigma_min=0.002,
                        sigma_max=80.0, backbone=f"digits-{args.backbone}", pool=args.pool,
                        hidden=args.hidden,
                        shift_bound=args.shift_bound, scale_bound=args.scale_bound, num_train=args.num_train,
                        num_val=args.num_val, cache_dir=args.cache,
                        fit_config=FitConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size))
    for stage, r in zip(("blind", "phi"), phi.fit_results, strict=False):
        print(f"{stage}: validation teacher MSE {r.init_val:.5g} -> {r.best_val:.5g} "
              f"(best step {r.best_step}, {r.wall_s:.0f} s)")
    phi.save(args.out, fit=[r.__dict__ | {"history": r.history[-1:]} for r in phi.fit_results])
    print(f"wrote {args.out}")


def _eval(args: argparse.Namespace) -> None:
    from .digits import load_backbone
    from .predictor import HEURISTICS, Predictor, PredictorConfig, ScheduleConfig
    from .tuning import TuningSetup, evaluate

    phi = Predictor.load(args.checkpoint)
    c = phi.config
    kind = c.backbone.removeprefix("digits-")
    model = load_backbone(kind)
    setup = TuningSetup(model, c.schedule, c.solver, c.shape, c.backbone, cache_dir=args.cache)
    cache, seeds = setup.cache(), range(HELD_OUT, HELD_OUT + args.samples)
    cache.build(model, seeds)
    test = cache.load(seeds)
    print(f"{c.backbone}, {c.solver}, NFE {c.schedule.nfe}, {args.samples} held-out seeds "
          f"[{seeds.start}, {seeds.stop}); teacher {cache.teacher}")
    rows = [(f"heuristic {h}", Predictor(PredictorConfig(
        ScheduleConfig(**{**c.schedule.__dict__, "init": h}), c.solver, c.shape, blind=True)))
        for h in HEURISTICS]
    rows.append(("INDIS phi", phi))
    for name, head in rows:
        mse = float(evaluate(head, model, test, c.solver).mean())
        psnr = 10 * math.log10(4.0 / mse)  # data range [-1, 1]
        print(f"  {name:28s} teacher MSE {mse:.5f}   PSNR {psnr:6.2f} dB")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="indis", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="tune an INDIS predictor for a shipped digits backbone")
    f.add_argument("--backbone", choices=("unet", "dit"), default="unet")
    f.add_argument("--nfe", type=int, default=5)
    f.add_argument("--solver", default="ipndm")
    f.add_argument("--pool", type=int, default=None, help="average-pool the noise to pool x pool first")
    f.add_argument("--hidden", type=int, default=128)
    f.add_argument("--shift-bound", type=float, default=0.1)
    f.add_argument("--scale-bound", type=float, default=0.05)
    f.add_argument("--num-train", type=int, default=1024)
    f.add_argument("--num-val", type=int, default=256)
    f.add_argument("--steps", type=int, default=400)
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--cache", default=".indis-cache/teacher")
    f.add_argument("--out", default="phi.safetensors")
    e = sub.add_parser("eval", help="compare a predictor checkpoint with the heuristics on held-out seeds")
    e.add_argument("checkpoint")
    e.add_argument("--samples", type=int, default=512)
    e.add_argument("--cache", default=".indis-cache/teacher")
    args = p.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    {"fit": _fit, "eval": _eval}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
