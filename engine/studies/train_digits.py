"""Train or check the digits backbones and classifier (``indis.engine.testbeds.digits``).

``python -m indis.engine.studies.train_digits train --out DIR [--which unet|dit|classifier|all] [--steps N]``
retrains (seeded; 2 CPU threads) and writes ``digits_{name}.safetensors`` + ``.json`` into DIR;
``python -m indis.engine.studies.train_digits check [--weights DIR]`` prints accuracy and FD numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from indis.engine.testbeds.digits import WEIGHTS_DIR, check, save_model, train_backbone, train_classifier


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m indis.engine.studies.train_digits",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    tp = sub.add_parser("train", help="retrain and write weights")
    tp.add_argument("--which", choices=["unet", "dit", "classifier", "all"], default="all")
    tp.add_argument("--steps", type=int, default=None, help="training steps (default: per-model config)")
    tp.add_argument("--out", type=Path, required=True,
                    help="directory for the weights (the repository's engine/weights holds the shipped ones)")
    tp.add_argument("--threads", type=int, default=2)
    tp.add_argument("--seed", type=int, default=0)
    cp = sub.add_parser("check", help="print classifier accuracy and FD of samples")
    cp.add_argument("--n", type=int, default=1797)
    cp.add_argument("--steps", type=int, default=30)
    cp.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    cp.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cmd == "train":
        order = ["classifier", "unet", "dit"] if args.which == "all" else [args.which]
        for name in order:
            if name == "classifier":
                model, rec = train_classifier(args.steps, seed=args.seed)
                extra = f"test accuracy {rec['test_accuracy']:.4f}"
            else:
                model, rec = train_backbone(name, args.steps, seed=args.seed)  # type: ignore[arg-type]
                extra = (f"EMA test loss uncond {rec['eval_loss_test_uncond']:.4f} / "
                         f"cond {rec['eval_loss_test_cond']:.4f}")
            path = save_model(name, model, rec, args.out)
            print(f"{name}: {rec['params']:,} params, {rec['steps']} steps in {rec['wall_time_s']:.1f} s, "
                  f"final loss {rec['final_loss']:.4f}, {extra} -> {path}", flush=True)
    else:
        check(args.n, args.steps, weights_dir=args.weights)


if __name__ == "__main__":
    main(sys.argv[1:])
