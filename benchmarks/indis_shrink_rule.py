"""Which shrink factor toward phi's mean schedule generalises, decided on development seeds.

    python benchmarks/indis_shrink_rule.py [--cells digits-gmm:7 digits-unet:5] [--dev 2048]
        [--out benchmarks/results/quality/shrink_rule.md]

For each (testbed, NFE) cell phi is tuned as the quality tables tune it (``fit_predictor`` with the testbed's
settings -- ``tuning.BLIND_FIT`` / ``PHI_FIT`` on the digits testbeds -- and the same tuning seeds) but with
``shrink=False``, then each factor a of ``tuning.SHRINK_FACTORS`` (raw(x) -> m + a (raw(x) - m), m phi's
mean over the tuning seeds; a = 0 is one global schedule) is measured on the validation seeds and on
development seeds [2^21, 2^21 + ``--dev``) (``quality.development_data``) that neither tuning nor the
reported results use. Each line: the teacher MSE, and the paired difference to a = 0 in standard errors
(z > 0: the factor beats the mean schedule). Then which factor each rule picks -- the lowest validation mean
(the former default) and ``shrink_toward_mean``'s margin of two paired standard errors over a = 0 (the
default) -- and the development MSE of that pick.
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import torch

from indis.engine.studies.quality import TESTBEDS, development_data
from indis.engine.tuning.fit import SHRINK_FACTORS, evaluate, fit_predictor, shrink_toward_mean


def z_vs_mean(loss: torch.Tensor, null: torch.Tensor) -> float:
    """How far ``loss`` is below ``null`` (a = 0) in standard errors of the paired per-seed difference
    (+-inf for a gain without spread, 0 without a gain)."""
    diff = null - loss
    mean, se = float(diff.mean()), float(diff.std() / math.sqrt(len(diff)))
    return mean / se if se > 0 else math.copysign(math.inf, mean) if mean else 0.0


def cell(name: str, nfe: int, dev: int, cache: str) -> list[str]:
    tb = TESTBEDS[name]()
    model = tb.load()
    train, val, dev_data = development_data(tb, model, nfe, dev, cache)
    phi = fit_predictor(model, nfe=nfe, solver=tb.solver, shape=tb.shape, sigma_min=tb.sigma_min,
                        sigma_max=tb.sigma_max, num_classes=tb.num_classes, backbone=tb.name, pool=tb.pool,
                        fit_config=tb.phi, blind_config=tb.blind, data=(train, val), shrink=False)
    losses = {}
    for a in SHRINK_FACTORS:
        head = copy.deepcopy(phi)
        shrink_toward_mean(head, model, train, val, tb.solver, factors=(a,))
        losses[a] = {split: evaluate(head, model, d, tb.solver).double() for split, d in
                     (("val", val), ("dev", dev_data))}
    lines = [f"### {name}, NFE {nfe} ({tb.solver}; {len(val)} validation seeds, {dev} development seeds)", "",
             "| a | validation MSE | z vs a = 0 (validation) | development MSE | z vs a = 0 (development) |",
             "|---|---|---|---|---|"]
    null = losses[0.0]
    for a, loss in losses.items():
        lines.append(f"| {a:g} | {loss['val'].mean():.5g} | {z_vs_mean(loss['val'], null['val']):+.2f} "
                     f"| {loss['dev'].mean():.5g} | {z_vs_mean(loss['dev'], null['dev']):+.2f} |")
    lowest = min(losses, key=lambda a: float(losses[a]["val"].mean()))
    margin = shrink_toward_mean(copy.deepcopy(phi), model, train, val, tb.solver)
    for rule, a in (("lowest validation mean", lowest), ("margin of 2 paired s.e. over a = 0", margin)):
        dev_mse = float(losses[a]["dev"].mean())
        rel = 100 * (dev_mse / float(null["dev"].mean()) - 1)
        lines.append(f"\n{rule}: a = {a:g}, development MSE {dev_mse:.5g} ({rel:+.1f} % vs a = 0)")
    print("\n".join(lines), flush=True)
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", nargs="+", default=["digits-gmm:7", "digits-unet:5"],
                   help="TESTBED:NFE cells (unconditional testbeds; a conditional phi is never shrunk)")
    p.add_argument("--dev", type=int, default=2048, help="development seeds")
    p.add_argument("--cache", default=".indis-cache/teacher")
    p.add_argument("--out", default="benchmarks/results/quality/shrink_rule.md")
    a = p.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    cells = []
    for spec in a.cells:
        name, _, nfe = spec.partition(":")
        if name not in TESTBEDS or TESTBEDS[name]().num_classes or not nfe.isdigit():
            p.error(f"{spec!r}: give TESTBED:NFE with an unconditional testbed of {sorted(TESTBEDS)}")
        cells.append((name, int(nfe)))
    lines = ["## The shrink rule on development seeds (`python benchmarks/indis_shrink_rule.py "
             + " ".join(["--cells", *a.cells, "--dev", str(a.dev)]) + "`)", ""]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, nfe in cells:
        lines += cell(name, nfe, a.dev, a.cache)
        out.write_text("\n".join(lines) + "\n")  # after every cell: a later failure keeps the earlier ones
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
