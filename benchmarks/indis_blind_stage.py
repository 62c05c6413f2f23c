"""The blind stage's budget and which of its states to keep, decided on development seeds.

    python benchmarks/indis_blind_stage.py --testbed mixture16 --mixtures 1 2 3 4 [--nfe 3 5]
    python benchmarks/indis_blind_stage.py --testbed digits-unet --nfe 5 [--dev 1024]
        [--variants 600:3e-2:best 1200:1e-2:last ...] [--out benchmarks/results/quality/convergence]

The blind head (grid + Δτ + γ, no instance input) is tuned from ``fit_predictor``'s start (``start_grid``:
the best of GITS and the heuristics on the tuning seeds) by each variant ``STEPS:LR:KEEP[:BATCH[:LBFGS]]``
(Adam, batch 64 unless given, cosine decay; ``best`` = the state with the lowest validation loss, checked
every 25 steps with patience 10 -- the rule before this study; ``last`` = the final state, validation not
used; ``LBFGS`` > 0 = that many full-batch L-BFGS iterations after the Adam steps,
``FitConfig.lbfgs_steps``). The kept state is measured
on development seeds [2^21, 2^21 + ``--dev``): neither tuning nor held-out seeds, so this study may choose
defaults without touching what the quality tables and ``benchmarks/indis_vs_global.py`` report. On the
mixtures (``quality.mixture_testbed``; seeds 1-4 here, the check uses 100+) the reference is the long
full-batch fit (3000 Adam steps, lr 1e-2, the final state); on the digits backbones, where that costs hours,
the first variant. Each line: the kept state's MSE on the tuning seeds, the validation seeds and the
development seeds, the paired difference to the reference with its standard error, and the wall time.
Writes ``<out>/blind_stage.md`` (every cell run so far, one JSON per cell under ``<out>/blind_stage/``; a
cell is rerun when its variants or development seeds differ from the ones asked for).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from indis.engine.core.predictor import Predictor, PredictorConfig
from indis.engine.studies.quality import (
    CHECK_MIXTURES,
    DEVELOPMENT,
    TESTBEDS,
    Testbed,
    development_data,
    mixture_testbed,
)
from indis.engine.tuning.fit import FitConfig, evaluate, fit, start_grid

VARIANTS = ("600:3e-2:best", "600:2e-2:last", "1200:1e-2:last", "1200:2e-2:last", "1200:3e-2:last")
LONG = "3000:1e-2:last:1024"


def config(spec: str) -> FitConfig:
    """``STEPS:LR:KEEP[:BATCH[:LBFGS]]`` -> the fit configuration of one variant (ValueError if malformed)."""
    parts = spec.split(":")
    if len(parts) not in (3, 4, 5):
        raise ValueError(f"variant {spec!r} is not STEPS:LR:KEEP[:BATCH[:LBFGS]]")
    steps, lr, keep, batch, lbfgs = parts + ["64", "0"][len(parts) - 3:]
    return FitConfig(steps=int(steps), batch_size=int(batch), lr=float(lr), keep=keep, lbfgs_steps=int(lbfgs),
                     val_every=25, patience=10, progress=False)


def cell(tb: Testbed, nfe: int, variants: list[str], dev: int, cache: str) -> dict:
    model = tb.load()
    train, val, dev_data = development_data(tb, model, nfe, dev, cache)
    sc = tb.schedule(nfe)
    grid, start = start_grid(model, train, sc, tb.solver)
    runs = {}
    for spec in variants:
        head = Predictor(PredictorConfig(sc, tb.solver, tb.shape, blind=True, num_classes=tb.num_classes),
                         base=sc.raw_from_grid(grid))
        cfg = config(spec)
        r = fit(head, model, train, val if cfg.keep == "best" else None, tb.solver, cfg)
        losses = {name: evaluate(head, model, d, tb.solver).double()
                  for name, d in (("train", train), ("val", val), ("dev", dev_data))}
        runs[spec] = {"train": float(losses["train"].mean()), "val": float(losses["val"].mean()),
                      "dev": losses["dev"], "best_step": r.best_step, "wall_s": r.wall_s}
        print(f"{tb.name} NFE {nfe} {spec}: dev {losses['dev'].mean():.5g} ({r.wall_s:.0f} s)", flush=True)
    return {"testbed": tb.name, "nfe": nfe, "start": start["chosen"],
            "dev_seeds": [DEVELOPMENT, DEVELOPMENT + dev], "reference": variants[0],
            "runs": paired(runs, variants[0])}


def paired(runs: dict, reference: str) -> dict:
    """Replace each run's per-seed development losses by their mean and the paired relative difference to
    the reference run (mean and standard error)."""
    ref = runs[reference]["dev"]
    out = {}
    for spec, r in runs.items():
        diff = (r["dev"] - ref) / ref.mean()
        out[spec] = {**r, "dev": float(r["dev"].mean()), "vs_reference": float(diff.mean()),
                     "vs_reference_se": float(diff.std() / len(diff) ** 0.5)}
    return out


def markdown(cells: list[dict]) -> str:
    lines = ["## Blind stage: budget and kept state (development seeds; Adam, batch 64 unless a fourth field "
             "says otherwise, cosine decay; a fifth field: full-batch L-BFGS iterations after Adam)", "",
             "| testbed | NFE | variant (steps:lr:keep[:batch[:lbfgs]]) | tuning MSE | val MSE | dev MSE | "
             "vs reference (± 1 s.e., paired) | s |", "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        for spec, r in c["runs"].items():
            tag = "reference" if spec == c["reference"] else (f"{100 * r['vs_reference']:+.1f} % "
                                                              f"(± {100 * r['vs_reference_se']:.1f} %)")
            lines.append(f"| {c['testbed']} | {c['nfe']} | {spec} | {r['train']:.5g} | {r['val']:.5g} | "
                         f"{r['dev']:.5g} | {tag} | {r['wall_s']:.0f} |")
    versus: dict[tuple[str, str], list[float]] = {}
    for c in cells:
        for spec, r in c["runs"].items():
            if spec != c["reference"]:
                versus.setdefault((spec, c["reference"]), []).append(100 * r["vs_reference"])
    lines.append("")
    lines += [f"{spec} vs {ref}: mean {sum(v) / len(v):+.1f} % over {len(v)} cells (range {min(v):+.1f} … "
              f"{max(v):+.1f} %)" for (spec, ref), v in versus.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--testbed", default="mixture16", choices=("mixture16", "digits-unet", "digits-dit"))
    p.add_argument("--mixtures", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--nfe", type=int, nargs="+", default=None)
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"STEPS:LR:KEEP[:BATCH[:LBFGS]] (default {' '.join(VARIANTS)}; mixtures: the long "
                   "fit first)")
    p.add_argument("--dev", type=int, default=4096, help="development seeds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=".indis-cache/teacher")
    p.add_argument("--out", default="benchmarks/results/quality/convergence")
    a = p.parse_args()
    mixture = a.testbed == "mixture16"
    variants = a.variants or ([LONG, *VARIANTS] if mixture else list(VARIANTS))
    for spec in variants:
        try:
            config(spec)
        except ValueError as e:
            p.error(str(e))
    if a.dev < 2:
        p.error("--dev needs at least 2 seeds (a standard error)")
    if mixture and max(a.mixtures) >= CHECK_MIXTURES:
        p.error(f"mixtures >= {CHECK_MIXTURES} are the check of benchmarks/indis_vs_global.py; do not tune "
                "defaults on them")
    torch.set_num_threads(a.threads)
    testbeds = [mixture_testbed(s) for s in a.mixtures] if mixture else [TESTBEDS[a.testbed]()]
    cells_dir = Path(a.out) / "blind_stage"
    cells_dir.mkdir(parents=True, exist_ok=True)
    for tb in testbeds:
        for nfe in a.nfe or tb.nfes:
            path = cells_dir / f"{tb.name}_nfe{nfe}.json"
            if path.exists():  # reused only if it holds exactly these variants on these development seeds
                old = json.loads(path.read_text())
                if list(old["runs"]) == variants and old["dev_seeds"] == [DEVELOPMENT, DEVELOPMENT + a.dev]:
                    continue
            t0 = time.perf_counter()
            record = cell(tb, nfe, variants, a.dev, a.cache)
            record["wall_s"] = time.perf_counter() - t0
            path.write_text(json.dumps(record))
    cells = [json.loads(f.read_text()) for f in sorted(cells_dir.glob("*.json"))]
    text = markdown(cells)
    (Path(a.out) / "blind_stage.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
