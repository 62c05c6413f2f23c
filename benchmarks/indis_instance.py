"""Does phi use the instance? Every phi variant against its equal-budget blind ablation and its own mean.

    python benchmarks/indis_instance.py [--testbed digits-unet] [--nfe 3 5] [--samples 1024]
        [--out benchmarks/results/quality/instance]

One (testbed, NFE) cell: the blind schedule is tuned as ``fit_predictor`` does by default (start from the best
of GITS and the heuristics on the tuning seeds, ``tuning.BLIND_FIT``). Every variant then starts from that
blind schedule exactly and is tuned with ``tuning.PHI_FIT`` (its optimiser budget), beside the control: the
blind schedule continued with the same settings (the equal-budget blind ablation). For each variant the
held-out teacher MSE (seeds [2^20, 2^20 + samples), never used for tuning), its own mean schedule (the raw
output averaged over the tuning seeds, per class for a conditional head: one global schedule), the MSE on
the tuning seeds and the FD to the data. Variants:

* ``x_T pooled 2x2`` (the quality tables' phi), then the same head shrunk toward its mean schedule by the
  factor ``tuning.shrink_toward_mean`` picks (what ``fit_predictor`` returns; this study ran under its former
  rule, the lowest validation loss), ``x_T raw``
  (the whole noise);
* ``x_T pooled + log-norm``: plus log(||eps||^2 / d), the sample's noise energy, a feature an MLP on pooled
  noise cannot form;
* ``D(x_T) pooled``: phi reads the first denoiser output D(x_T; sigma_max e^{dtau_0}) (standardised per pixel
  on the tuning seeds) beside the pooled noise. Every grid evaluates that call anyway, so phi then costs no
  extra network call if dtau_0 is global: the step-0 shift stays the blind schedule's (frozen); phi predicts
  everything else (the step-0 scale acts after the call);
* ``x_T pooled / raw, 8x tuning seeds``: 8192 tuning seeds instead of 1024, beside their own equal-budget
  blind control on those seeds;
* ``oracle distilled``: a per-instance oracle with phi's capacity fitted on 256 tuning seeds (Adam, a light L2
  on its offsets from the blind schedule), phi regressed onto its raw outputs, then tuned end to end;
* ``x_T pooled, feature loss``: the loss adds the squared distance of digits-classifier features (the
  project's stand-in for the paper's LPIPS), weighted to equal the MSE term at the start.

The per-instance oracle on the first 128 held-out seeds (fitted on them: an upper bound, not a method) shows
the headroom. Each finished cell is written to ``<out>/cells/<testbed>_nfe<N>.json`` (a rerun skips it);
``<out>/instance.md`` holds one table for every cell.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from indis.engine.core.predictor import Predictor, PredictorConfig
from indis.engine.core.schedules import Schedule
from indis.engine.studies.quality import HELD_OUT, TESTBEDS, Testbed, generate
from indis.engine.testbeds.digits import fd_to_data, load_classifier
from indis.engine.tuning.fit import (
    BLIND_FIT,
    PHI_FIT,
    FitConfig,
    fit,
    fit_oracle,
    phi_from_blind,
    sample_loss,
    shrink_toward_mean,
    start_grid,
)
from indis.engine.tuning.teacher import TuningData

BIG = 8192  # tuning seeds of the "8x" variants


class FeatureHead(nn.Module):
    """phi on hand-made features of x_T (and optionally of D(x_T)): ``pool`` (2x2 average-pooled noise),
    ``raw`` (the whole noise), ``lognorm`` (log of the noise energy), ``D`` (2x2-pooled standardised first
    denoiser output; freezes the step-0 shift at the blind schedule's)."""

    def __init__(self, blind: Predictor, features: tuple[str, ...], model: nn.Module | None = None,
                 d_stats: tuple[Tensor, Tensor] | None = None) -> None:
        super().__init__()
        self.features, self.model = features, model
        c = blind.config
        shape = c.shape
        dims = {"pool": shape[0] * 4, "raw": math.prod(shape), "lognorm": 1, "D": shape[0] * 4}
        inner = PredictorConfig(c.schedule, c.solver, (sum(dims[f] for f in features),), backbone=c.backbone,
                                num_classes=c.num_classes, class_scale=c.class_scale, input_scale=1.0)
        self.inner = phi_from_blind(inner, blind)
        self.config, self.input_scale = self.inner.config, c.input_scale
        self.d_stats = d_stats
        mask = torch.ones(c.schedule.width, dtype=torch.float64)
        if "D" in features:  # the step-0 shift must stay global: D is read at that call
            mask[c.schedule.num_logits] = 0.0
            self.inner.base.register_hook(lambda g: g * self.mask)
        self.register_buffer("mask", mask)

    def first_output(self, x_T: Tensor, labels: Tensor | None) -> Tensor:
        with torch.no_grad():
            s0 = self.config.schedule.decode(self.inner.base[None]).shift[0, 0]
            sigma = (self.config.schedule.sigma_max * torch.exp(s0)).to(x_T.dtype).expand(x_T.shape[0])
            cond = {} if labels is None else {"class_labels": labels}
            return self.model(x_T, sigma, **cond)

    def inputs(self, x_T: Tensor, labels: Tensor | None) -> Tensor:
        eps = x_T * self.input_scale
        d = math.prod(eps.shape[1:])
        out = []
        for f in self.features:
            if f == "pool":
                out.append(F.adaptive_avg_pool2d(eps, 2).flatten(1) * math.sqrt(eps.shape[-1] ** 2 / 4))
            elif f == "raw":
                out.append(eps.flatten(1))
            elif f == "lognorm":  # unit variance under N(0, I): log(chi2_d / d) has std ~ sqrt(2 / d)
                out.append(torch.log(eps.square().flatten(1).mean(1, keepdim=True)) * math.sqrt(d / 2))
            else:
                mean, std = self.d_stats
                z = (self.first_output(x_T, labels) - mean) / std
                out.append(F.adaptive_avg_pool2d(z, 2).flatten(1) * math.sqrt(z.shape[-1] ** 2 / 4))
        return torch.cat(out, 1)

    def raw(self, x_T: Tensor, cond: Tensor | None = None, index: Tensor | None = None) -> Tensor:
        res = self.inner.residual(self.inputs(x_T, cond), cond, None)
        return self.inner.base + res.to(torch.float64) * self.mask

    def forward(self, x_T: Tensor, cond: Tensor | None = None, index: Tensor | None = None) -> Schedule:
        return self.config.schedule.decode(self.raw(x_T, cond))


def mean_schedule(head: nn.Module, data: TuningData):
    """The head's raw output averaged over ``data`` (per class when it reads labels), decoded."""
    decode = head.config.schedule.decode
    with torch.no_grad():
        if data.labels is None or head.config.num_classes == 0:
            m = decode(torch.cat([head.raw(data.x_T[i:i + 512], None) for i in range(0, len(data), 512)])
                       .mean(0, keepdim=True))
            return lambda x, c: Schedule(m.grid[0], m.shift[0], m.scale[0])
        raws = torch.stack([head.raw(data.x_T[data.labels == k], data.labels[data.labels == k]).mean(0)
                            for k in range(head.config.num_classes)])
        return lambda x, c: decode(raws[c])


def concat(a: TuningData, b: TuningData) -> TuningData:
    return TuningData(torch.cat([a.seeds, b.seeds]), torch.cat([a.x_T, b.x_T]),
                      None if a.labels is None else torch.cat([a.labels, b.labels]), torch.cat([a.x0, b.x0]))


def distil(head: Predictor, oracle, data: TuningData, steps: int = 500) -> None:
    """Regress ``head``'s raw output onto the oracle's on ``data`` (no backbone in this loop)."""
    with torch.no_grad():
        target = oracle.raw(data.x_T, data.labels, torch.arange(len(data)))
    opt = torch.optim.Adam([p for n, p in head.named_parameters() if n != "base"], lr=1e-3, weight_decay=1e-4)
    for _ in range(steps):
        loss = (head.raw(data.x_T, data.labels) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def run_cell(tb: Testbed, nfe: int, samples: int, cache: str, log) -> dict:
    model = tb.load()
    setup = replace(tb, num_val=512).tuning_setup(model, nfe, cache)
    train, val = setup.data(progress=False)
    cache_obj = setup.cache()
    held_seeds = range(HELD_OUT, HELD_OUT + samples)
    cache_obj.build(model, held_seeds, progress=False)
    held = cache_obj.load(held_seeds)
    extra_seeds = range(len(train) + len(val), len(val) + BIG)
    cache_obj.build(model, extra_seeds, progress=False)
    big = concat(train, cache_obj.load(extra_seeds))
    sc, solver = setup.schedule, tb.solver
    pc = PredictorConfig(sc, solver, tb.shape, backbone=tb.name, num_classes=tb.num_classes)
    grid, start = start_grid(model, train, sc, solver)
    blind = Predictor(replace(pc, blind=True), base=sc.raw_from_grid(grid))
    t = time.perf_counter()
    fit(blind, model, train, val, solver, replace(BLIND_FIT, progress=False))
    log(f"start {start['chosen']}, blind stage {time.perf_counter() - t:.0f} s")
    cfg = replace(PHI_FIT, progress=False)
    rows: dict[str, dict] = {}
    train_eval = train.subset(torch.arange(min(1024, len(train))))

    def mse(fn, data: TuningData) -> tuple[float, Tensor]:
        out = generate(fn, model, data, solver)
        return float(sample_loss(out, data.x0, "l2").mean()), out

    def measure(name: str, head: nn.Module, wall: float, mean_of: nn.Module | None = None) -> None:
        head.eval()
        def fn(x: Tensor, c: Tensor | None) -> Schedule:
            return head(x, c)

        held_mse, out = mse(fn, held)
        row = {"held_out": held_mse, "train": mse(fn, train_eval)[0], "fd_data": fd_to_data(out),
               "tune_s": round(wall, 1)}
        if mean_of is not None:
            row["mean_schedule"] = mse(mean_schedule(mean_of, train), held)[0]
        rows[name] = row
        log(f"{name:36s} held-out {held_mse:.5g}" + (f" (its mean {row['mean_schedule']:.5g})"
                                                     if mean_of is not None else ""))

    measure("blind stage (start of every variant)", blind, 0.0)
    control = copy.deepcopy(blind)
    measure("blind, equal budget (the control)", control, fit(control, model, train, val, solver, cfg).wall_s)

    def tune(name: str, head: nn.Module, data: TuningData = train, fc: FitConfig = cfg, feature_net=None):
        r = fit(head, model, data, val, solver, fc, feature_net=feature_net)
        measure(name, head, r.wall_s, head)
        return head, r.wall_s

    with torch.no_grad():
        d0 = torch.cat([FeatureHead(blind, ("D",), model).first_output(train.x_T[i:i + 512],
                        None if train.labels is None else train.labels[i:i + 512])
                        for i in range(0, len(train), 512)])
    d_stats = (d0.mean(0), d0.std(0) + 1e-3)
    pooled, wall = tune("x_T pooled 2x2", phi_from_blind(replace(pc, pool=2), blind))
    a = shrink_toward_mean(pooled, model, train, val, solver)
    measure(f"x_T pooled 2x2, shrunk toward its mean (a = {a:g}; fit_predictor's default)", pooled, wall,
            pooled)
    tune("x_T raw", phi_from_blind(pc, blind))
    tune("x_T pooled + log-norm", FeatureHead(blind, ("pool", "lognorm")))
    tune("D(x_T) pooled + x_T pooled", FeatureHead(blind, ("pool", "D"), model, d_stats))
    big_control = copy.deepcopy(blind)
    measure(f"blind, equal budget, {BIG} tuning seeds", big_control,
            fit(big_control, model, big, val, solver, cfg).wall_s)
    tune(f"x_T pooled, {BIG} tuning seeds", phi_from_blind(replace(pc, pool=2), blind), big)
    tune(f"x_T raw, {BIG} tuning seeds", phi_from_blind(pc, blind), big)

    sub = train.subset(torch.arange(256))
    t = time.perf_counter()
    oracle = fit_oracle(model, sub, pc, FitConfig(steps=200, batch_size=256, lr=0.05, clip=None,
                                                  weight_decay=1e-3, patience=10**9, progress=False),
                        base=blind.base.detach())
    sub_index = torch.arange(len(sub))
    oracle_train = {"oracle": mse(lambda x, c: oracle(x, c, sub_index), sub)[0],
                    "blind": mse(lambda x, c: blind(x, c), sub)[0]}
    distilled = phi_from_blind(replace(pc, pool=2), blind)
    distil(distilled, oracle, sub)
    wall = time.perf_counter() - t
    measure("oracle distilled (256 seeds), no tuning", distilled, wall, distilled)
    tune("oracle distilled, then tuned", distilled)

    clf = load_classifier()
    clf.requires_grad_(False)

    def features(x: Tensor) -> Tensor:
        return clf.features(x.float().clamp(-1, 1))

    probe = train.subset(torch.arange(256))
    with torch.no_grad():
        out = generate(lambda x, c: blind(x, c), model, probe, solver)
        ratio = float(sample_loss(out, probe.x0, "l2").mean()
                      / (features(out) - features(probe.x0)).square().sum(1).mean())
    tune("x_T pooled, feature loss", phi_from_blind(replace(pc, pool=2), blind),
         fc=replace(cfg, feature_weight=ratio), feature_net=features)

    osub = held.subset(torch.arange(min(128, len(held))))
    ocfg = FitConfig(steps=200, batch_size=128, lr=0.05, clip=None, patience=10**9, progress=False)
    oracle = fit_oracle(model, osub, pc, ocfg, base=control.base.detach())
    index = torch.arange(len(osub))
    o = mse(lambda x, c: oracle(x, c, index), osub)[0]
    c = mse(lambda x, c: control(x, c), osub)[0]
    log(f"per-instance oracle on 128 held-out seeds {o:.5g} vs the control {c:.5g}")
    return {"testbed": tb.name, "nfe": nfe, "solver": solver, "samples": samples, "start": start,
            "train": len(train), "val": len(val), "rows": rows, "oracle_128": {"oracle": o, "control": c},
            "oracle_train": oracle_train,
            "feature_weight": ratio, "threads": torch.get_num_threads()}


def markdown(cells: list[dict]) -> str:
    lines = []
    for c in cells:
        ctrl = c["rows"]["blind, equal budget (the control)"]["held_out"]
        lines += [f"## {c['testbed']}, {c['solver']}, NFE {c['nfe']} ({c['samples']} held-out seeds; "
                  f"tuning seeds {c['train']} + {c['val']} validation; start {c['start']['chosen']})", "",
                  "| variant | held-out teacher MSE | vs equal-budget blind | its mean schedule | "
                  "vs its mean | train MSE | FD to data | tuning s |", "|---|---|---|---|---|---|---|---|"]
        for name, r in c["rows"].items():
            m = r.get("mean_schedule")
            lines.append(f"| {name} | {r['held_out']:.5g} | {100 * (r['held_out'] / ctrl - 1):+.1f} % | "
                         + (f"{m:.5g} | {100 * (r['held_out'] / m - 1):+.1f} % | " if m else "– | – | ")
                         + f"{r['train']:.5g} | {r['fd_data']:.4g} | {r['tune_s']:.0f} |")
        t = c["oracle_train"]
        lines += ["", "The oracle that was distilled, on its own 256 tuning seeds: "
                  f"{t['oracle']:.5g} vs the blind stage's {t['blind']:.5g} "
                  f"({100 * (t['oracle'] / t['blind'] - 1):+.1f} %)."]
        o = c["oracle_128"]
        lines += ["", "Per-instance oracle (phi's capacity, fitted on the first 128 held-out seeds "
                  f"themselves: the headroom, not a method): {o['oracle']:.5g} vs the control's "
                  f"{o['control']:.5g} on them ({100 * (o['oracle'] / o['control'] - 1):+.1f} %).", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--testbed", default="digits-unet", choices=("digits-unet", "digits-dit", "digits-gmm"))
    p.add_argument("--nfe", type=int, nargs="+", default=[3, 5])
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--cache", default=".indis-cache/teacher")
    p.add_argument("--out", default="benchmarks/results/quality/instance")
    a = p.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    out = Path(a.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    tb = TESTBEDS[a.testbed]()
    for nfe in a.nfe:
        path = out / "cells" / f"{tb.name}_nfe{nfe}.json"
        if path.exists():
            print(f"{tb.name} NFE {nfe}: reusing {path}")
            continue
        t0 = time.perf_counter()

        def log(msg: str, t0: float = t0, nfe: int = nfe) -> None:
            print(f"[{time.perf_counter() - t0:6.0f} s] {tb.name} NFE {nfe}: {msg}", flush=True)

        cell = run_cell(tb, nfe, a.samples, a.cache, log)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cell, indent=1))
        tmp.replace(path)
    cells = [json.loads(f.read_text()) for f in sorted((out / "cells").glob("*.json"))]
    text = markdown(cells)
    (out / "instance.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
