"""Train or check the Fashion-MNIST backbone and classifier (``indis.engine.testbeds.fashion``).

``python -m indis.engine.studies.train_fashion train --out DIR [--which unet|classifier|all] [--steps N]
[--data DIR]`` trains (seeded; 2 CPU threads by default; the UNet resumes from ``DIR/fashion_unet.ckpt``
after an interruption) and writes ``fashion_{name}.safetensors`` + ``.json`` into DIR, then prints the
quality (:func:`~indis.engine.testbeds.fashion.check`); ``python -m indis.engine.studies.train_fashion check
[--weights DIR]`` prints it for existing weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from indis.engine.testbeds.digits import WEIGHTS_DIR
from indis.engine.testbeds.fashion import check, train_classifier, train_unet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m indis.engine.studies.train_fashion",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    tp = sub.add_parser("train", help="train (or resume) and write weights, then print their quality")
    tp.add_argument("--which", choices=["unet", "classifier", "all"], default="all")
    tp.add_argument("--steps", type=int, default=None, help="training steps of the model named by --which "
                    "(with all: of the UNet; the classifier keeps its own)")
    tp.add_argument("--out", type=Path, required=True,
                    help="directory for the weights and the UNet's checkpoint (engine/weights holds the "
                         "shipped ones)")
    tp.add_argument("--no-check", action="store_true", help="skip the quality numbers at the end")
    cp = sub.add_parser("check", help="print classifier accuracy and FD of samples")
    cp.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    for p in (tp, cp):
        p.add_argument("--data", type=Path, default=None, help="directory of the four IDX files (default: "
                       "the Debian package's)")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--n", type=int, default=1000, help="samples for the quality numbers")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cmd == "train":
        progress = sys.stderr.isatty()
        if args.which in ("classifier", "all"):
            _, rec = train_classifier(args.out, None if args.which == "all" else args.steps, args.data,
                                      progress=progress)
            print(f"classifier: {rec['params']:,} params, {rec['steps']} steps in "
                  f"{rec['wall_time_s']:.0f} s, test accuracy {rec['test_accuracy']:.4f}", flush=True)
        if args.which in ("unet", "all"):
            _, rec = train_unet(args.out, args.steps, args.data, progress=progress)
            print(f"unet: {rec['params']:,} params, {rec['steps']} steps in {rec['wall_time_s']:.0f} s, "
                  f"final loss {rec['final_loss']:.4f}", flush=True)
        if not args.no_check and args.which == "all":
            check(args.out, args.data, args.n)
    else:
        check(args.weights, args.data, args.n)


if __name__ == "__main__":
    main(sys.argv[1:])
