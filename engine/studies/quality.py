"""INDIS quality tables (Yuan et al., CVPR 2026): every schedule method on the same held-out seeds.

    python -m indis.engine.studies.quality [--testbeds tree tree-s5 digits-unet digits-dit digits-gmm
                                            fashion-unet] [--out DIR]

Testbeds (``TESTBEDS``): the 2-D tree mixture of the paper's synthetic study (class A, Euler, NFE 3, exact
ODE end points; ``tree`` with sigma_max 80, ``tree-s5`` with 5), the shipped digits UNet (unconditional) and
DiT (class-conditional; phi reads the label) against their 30-step iPNDM teachers, the image-shaped exact
mixture on the digits against the exact ODE solution (scipy DOP853) -- these five by default -- and, when
named, the shipped Fashion-MNIST UNet (28x28, class-conditional; hours of CPU at the default budget).
Images are judged in their dataset's classifier features (``generation.feature_space``). Every tuned head
starts where ``fit_predictor`` starts by default: the best of GITS and the four heuristics on the tuning
seeds. Methods per NFE: the four heuristics, AYS (its SVD table stretched onto the testbed's range),
LD3-global, phi's blind ablation (one grid + Δτ + γ, no instance input, tuned for as many steps as phi's two
stages), phi, phi without shift/scale (the paper's second ablation); then, added by :func:`add_controls`,
GITS (dynamic programming over a fine grid) and phi's mean schedule (phi's raw output averaged over the
tuning noise: one global schedule, the control for instance-awareness); on the tree also the per-instance
oracles (an exhaustive pure-grid search over both interior points, and Adam-fitted schedules with phi's
Δτ/γ capacity).
"Best global" is the best of every global schedule.

Every (testbed, NFE) cell is written to ``DIR/cells/<testbed>_nfe<N>.json`` as soon as it is done and skipped
when present (``--force`` recomputes), so an interrupted run resumes; a cell records the optimiser settings
that tuned it (``fit_configs``, the numbers of tuning and validation seeds) and reusing one tuned under other
settings prints a warning. ``--steps``, ``--blind-steps``, ``--lbfgs-steps``, ``--ld3-steps``, ``--batch``,
``--train`` and ``--val`` try other settings (:func:`override`). The tuned heads and the GITS grids
(``<stem>_gits.json``, the format ``indis generate --schedule`` reads) land in ``DIR/heads``; ``--ship DIR``
copies the digits-UNet and Fashion-UNet heads among the testbeds run into DIR (the repository ships them in
``engine/weights/indis``). The tables go to stdout and ``DIR/quality.md``; plots (matplotlib, optional) to
``DIR/*.png``, and ``DIR/samples_<testbed>.png`` (:func:`sample_pictures`) for image testbeds whose GITS grids
and phi heads are saved.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from indis.engine.core.predictor import HEURISTICS, Predictor, PredictorConfig, ScheduleConfig
from indis.engine.core.sampling import sample
from indis.engine.core.schedules import Schedule, get_sigmas
from indis.engine.generation import FeatureSpace, feature_space
from indis.engine.tuning.fit import (
    BLIND_FIT,
    PHI_FIT,
    FitConfig,
    TuningSetup,
    fit,
    fit_gits,
    fit_global,
    fit_oracle,
    fit_predictor,
    sample_loss,
)
from indis.engine.tuning.teacher import TeacherSpec, TuningData

HELD_OUT = 1 << 20                    # first held-out seed (tuning seeds start at 0)
DEVELOPMENT = 1 << 21                 # first development seed: where studies choose defaults
EXACT = TeacherSpec(solver="exact")
MEAN_ROW = "phi's mean schedule (global)"
AYS_ROW = "AYS (SVD table, stretched)"
GITS_ROW = "GITS (dynamic programming)"
NOSS_ROW = "INDIS phi, no shift/scale"
ScheduleFn = Callable[[Tensor, "Tensor | None"], Schedule]
# LD3's optimiser (RMSprop 0.005, soft teacher, batch 50), drawing its batches from the shared tuning seeds
LD3_CONFIG = FitConfig(steps=150, batch_size=50, lr=0.005, optimizer="rmsprop", soft_teacher=True, clip=None,
                       patience=10**9, progress=False)


@dataclass(frozen=True)
class Testbed:
    """A backbone (or exact model), its sampling setup and how its heads are tuned."""

    __test__ = False  # not a pytest class

    name: str
    load: Callable[[], nn.Module]
    shape: tuple[int, ...]
    sigma_max: float
    solver: str = "ipndm"
    nfes: tuple[int, ...] = (3, 5, 7)
    sigma_min: float = 0.002
    num_classes: int = 0
    teacher: TeacherSpec = TeacherSpec()
    dtype: torch.dtype = torch.float32
    dataset: str | None = "digits"    # images judged in this feature space (FD, PSNR); None: not images
    shard_size: int = 256
    num_train: int = 1024
    num_val: int = 512
    pool: int | None = 2
    phi: FitConfig = field(default_factory=lambda: replace(PHI_FIT, progress=False))
    blind: FitConfig = field(default_factory=lambda: replace(BLIND_FIT, progress=False))
    ld3: FitConfig = field(default_factory=lambda: LD3_CONFIG)

    @property
    def images(self) -> bool:
        return self.dataset is not None

    def space(self) -> FeatureSpace | None:
        """The classifier and reference images FD is measured with (None when not images)."""
        return None if self.dataset is None else feature_space(self.dataset)

    def schedule(self, nfe: int, **kw) -> ScheduleConfig:
        return ScheduleConfig(nfe, self.sigma_min, self.sigma_max, **kw)

    def tuning_setup(self, model: nn.Module | None, nfe: int, cache_dir: str) -> TuningSetup:
        """Tuning data and teacher cache at ``nfe`` (``model`` may be None to read the cache only)."""
        return TuningSetup(model, self.schedule(nfe), self.solver, self.shape, self.name, self.num_classes,
                           self.teacher, self.num_train, self.num_val, cache_dir=cache_dir,
                           shard_size=self.shard_size, dtype=self.dtype)


def _tree(sigma_max: float) -> Testbed:
    from indis.engine.testbeds.mixtures import tree_mixture

    return Testbed(f"tree-s{sigma_max:g}" if sigma_max != 80 else "tree", lambda: tree_mixture(0), (2,),
                   sigma_max, solver="euler", nfes=(3,), teacher=EXACT, dtype=torch.float64, dataset=None,
                   shard_size=128, pool=None, phi=replace(PHI_FIT, batch_size=256, progress=False),
                   blind=replace(BLIND_FIT, batch_size=256, progress=False),
                   ld3=replace(LD3_CONFIG, steps=300))


def _digits(kind: str) -> Testbed:
    from indis.engine.testbeds.digits import load_backbone

    return Testbed(f"digits-{kind}", lambda: load_backbone(kind), (1, 8, 8), 80.0,
                   num_classes=10 if kind == "dit" else 0)


def _digits_gmm() -> Testbed:
    from indis.engine.testbeds.mixtures import digits_mixture

    return Testbed("digits-gmm", digits_mixture, (1, 8, 8), 80.0, teacher=EXACT, shard_size=128)


def _fashion() -> Testbed:
    from indis.engine.testbeds.fashion import load_backbone

    return Testbed("fashion-unet", load_backbone, (1, 28, 28), 80.0, num_classes=10, dataset="fashion",
                   shard_size=128)


CHECK_MIXTURES = 100  # mixture_testbed seeds from here on check defaults; smaller ones may choose them


def mixture_testbed(seed: int) -> Testbed:
    """A random 16-D anisotropic mixture (``testbeds.random_mixture(seed=seed)``; exact denoiser, exact ODE
    teacher), Euler at NFE 3 / 5: where studies choose defaults (small seeds) and check them (seeds 100+)."""
    from indis.engine.testbeds.mixtures import random_mixture

    return Testbed(f"mixture16-s{seed}", lambda: random_mixture(seed=seed), (16,), 80.0, solver="euler",
                   nfes=(3, 5), teacher=EXACT, dtype=torch.float64, dataset=None, shard_size=128, pool=None)


def development_data(tb: Testbed, model: nn.Module, nfe: int, n: int,
                     cache_dir: str) -> tuple[TuningData, TuningData, TuningData]:
    """``tb``'s tuning and validation data at ``nfe`` and ``n`` development seeds [DEVELOPMENT, DEVELOPMENT +
    n): neither tuning nor held-out seeds, so a study may choose defaults there (teacher end points built
    where missing)."""
    setup = tb.tuning_setup(model, nfe, cache_dir)
    train, val = setup.data(progress=False)
    cache, seeds = setup.cache(), range(DEVELOPMENT, DEVELOPMENT + n)
    cache.build(model, seeds, progress=False)
    return train, val, cache.load(seeds)


TESTBEDS: dict[str, Callable[[], Testbed]] = {
    "tree": lambda: _tree(80.0), "tree-s5": lambda: _tree(5.0), "digits-unet": lambda: _digits("unet"),
    "digits-dit": lambda: _digits("dit"), "digits-gmm": _digits_gmm, "fashion-unet": _fashion,
}
DEFAULT_TESTBEDS = ("tree", "tree-s5", "digits-unet", "digits-dit", "digits-gmm")  # fashion-unet when named


# ------------------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def generate(fn: ScheduleFn, model: nn.Module, data: TuningData, solver: str,
             batch_size: int = 256) -> Tensor:
    """End points of ``data.x_T`` under the schedule ``fn(x_T, labels)`` returns."""
    out = []
    for a in range(0, len(data), batch_size):
        x, c = data.x_T[a:a + batch_size], None if data.labels is None else data.labels[a:a + batch_size]
        out.append(sample(model, x, fn(x, c), solver, cond=None if c is None else {"class_labels": c}))
    return torch.cat(out)


def metrics(samples: Tensor, data: TuningData, space: FeatureSpace | None,
            teacher_features: Tensor | None) -> dict:
    """Teacher MSE (mean over dimensions, and summed); for images (``space``) PSNR (range [-1, 1]) and FD to
    the data and to the teacher (``teacher_features``) in the space's classifier features."""
    per = sample_loss(samples, data.x0, "l2")
    out = {"mse": float(per.mean()), "mse_sum": float(per.mean()) * math.prod(samples.shape[1:])}
    if space is not None:
        from indis.engine.testbeds.digits import frechet_distance

        feats = space.features(samples)
        out["psnr"] = float((10 * torch.log10(4.0 / per.clamp_min(1e-20))).mean())
        out["fd_data"] = frechet_distance(feats, space.reference)
        out["fd_teacher"] = frechet_distance(feats, teacher_features)
    return out


def _fixed(schedule: Schedule) -> ScheduleFn:
    return lambda x, c: schedule


def _heuristic(tb: Testbed, nfe: int, init: str) -> Predictor:
    return Predictor(PredictorConfig(tb.schedule(nfe, init=init), tb.solver, tb.shape, blind=True))


# ------------------------------------------------------------------------------------------------ the tree
def exhaustive_grids(model: nn.Module, data: TuningData, tb: Testbed, points: int = 32) -> dict:
    """NFE 3: every grid ``[sigma_max, s1, s2, sigma_min]`` with s1 > s2 on ``points`` log-spaced values;
    the best shared grid (global) and each sample's own best grid (the pure-grid per-instance oracle)."""
    sig = torch.logspace(math.log10(tb.sigma_max), math.log10(tb.sigma_min), points + 2,
                         dtype=torch.float64)[1:-1]
    pairs = torch.combinations(torch.arange(points), 2)  # i < j: s_i > s_j
    losses = []
    for i, j in pairs.tolist():
        grid = torch.stack([sig.new_tensor(tb.sigma_max), sig[i], sig[j], sig.new_tensor(tb.sigma_min)])
        losses.append(sample_loss(sample(model, data.x_T, grid, tb.solver), data.x0, "l2"))
    table = torch.stack(losses)  # [pairs, M]
    best = int(table.mean(1).argmin())
    i, j = pairs[best].tolist()
    return {"global": float(table.mean(1).min()), "oracle": float(table.min(0).values.mean()),
            "global_grid": [tb.sigma_max, float(sig[i]), float(sig[j]), tb.sigma_min], "points": points}


# ------------------------------------------------------------------------------------------------ one cell
class Bench:
    """The held-out seeds of one (testbed, NFE) cell, their teacher end points, and the measurements taken.

    The quality command and the demo both measure through :meth:`measure`, so every method sees the same
    seeds, the same teacher and the same metrics.
    """

    def __init__(self, tb: Testbed, nfe: int, *, samples: int, cache_dir: str,
                 progress: bool = True) -> None:
        self.tb, self.nfe, self.model = tb, nfe, tb.load()
        self.setup = tb.tuning_setup(self.model, nfe, cache_dir)
        self.log = _logger(f"{tb.name} NFE {nfe}")
        self.seeds = range(HELD_OUT, HELD_OUT + samples)
        self.log(f"teacher end points of held-out seeds {self.seeds.start}..{self.seeds.stop - 1}")
        cache = self.setup.cache()
        cache.build(self.model, self.seeds, progress=progress)
        self.held = cache.load(self.seeds)
        self.space = tb.space()
        self.teacher_features = None if self.space is None else self.space.features(self.held.x0)
        self.rows: dict[str, dict] = {}
        self.fns: dict[str, ScheduleFn] = {}
        self.losses: dict[str, Tensor] = {}  # per held-out seed teacher MSE, for paired comparisons

    def measure(self, name: str, fn: ScheduleFn, kind: str, wall: float = 0.0,
                train: TuningData | None = None, batch_size: int = 256) -> None:
        """Metrics of ``fn`` on the held-out seeds (and its teacher MSE on ``train``, for learned heads).
        ``kind``: global (counts towards "best global"), indis, ablation or oracle."""
        tb = self.tb
        self.fns[name] = fn
        samples = generate(fn, self.model, self.held, tb.solver, batch_size)
        row = metrics(samples, self.held, self.space, self.teacher_features)
        row.update(kind=kind, tune_s=round(wall, 1))
        self.losses[name] = sample_loss(samples, self.held.x0, "l2").double()
        if train is not None:
            row["train_mse"] = float(sample_loss(generate(fn, self.model, train, tb.solver), train.x0,
                                                 "l2").mean())
        self.rows[name] = row
        self.log(f"{name:28s} teacher MSE {row['mse']:.5g}"
                 + (f" (train {row['train_mse']:.5g})" if train is not None else ""))

    def record(self, **extra) -> dict:
        """The cell as JSON-able data: rows, the best global method, 64 grids of phi and of that method. Each
        row measured here gets ``se_vs_phi``: the standard error of its mean paired per-seed difference to
        INDIS phi's teacher MSE (per-seed errors are heavy-tailed; a gap within 2 s.e. is a tie)."""
        tb, rows = self.tb, self.rows
        phi = self.losses.get("INDIS phi")
        if phi is not None:
            for name, per in self.losses.items():
                rows[name]["se_vs_phi"] = float((per - phi).std() / math.sqrt(len(phi)))
        best = min((k for k, r in rows.items() if r["kind"] == "global"), key=lambda k: rows[k]["mse"])
        return {"testbed": tb.name, "nfe": self.nfe, "solver": tb.solver, "samples": len(self.held),
                "held_out_seeds": [self.seeds.start, self.seeds.stop], "teacher": tb.teacher.__dict__,
                "sigma": [tb.sigma_min, tb.sigma_max], "rows": rows, "best_global": best,
                "grids": {"phi": _grids(self.fns["INDIS phi"], self.held),
                          "best_global": _grids(self.fns[best], self.held)}, **extra}

    def heuristics(self) -> None:
        """The four heuristics and AYS (its SVD table, the one EDM-VE table, stretched in log sigma onto
        this testbed's range: AYS defines no table for these backbones)."""
        tb = self.tb
        for h in HEURISTICS:
            self.measure(f"heuristic {h}", _heuristic(tb, self.nfe, h), "global")
        ays = get_sigmas("ays", self.nfe, tb.sigma_min, tb.sigma_max, table="svd")
        self.measure(AYS_ROW, _fixed(Schedule(ays)), "global")


def blind_ablation(phi: Predictor, model: nn.Module, data: tuple[TuningData, TuningData],
                   tb: Testbed) -> tuple[Predictor, float]:
    """phi's blind ablation with phi's optimiser budget: the blind stage continued for as many steps, with
    the same settings, as phi's own stage (so phi's gain is not just more tuning of the global part, which
    phi keeps tuning through its ``base``). Returns the head and the total tuning wall time."""
    blind = copy.deepcopy(phi.blind)
    more = fit(blind, model, data[0], data[1], tb.solver, tb.phi)
    return blind.eval(), phi.fit_results[0].wall_s + more.wall_s




@torch.no_grad()
def mean_schedule(phi: Predictor, x_T: Tensor, labels: Tensor | None) -> ScheduleFn:
    """phi's raw output averaged over ``x_T`` (per class for a class-conditional phi; a class absent from
    ``labels`` gets the average over all of them), decoded: one global schedule (per class). The control for
    instance-awareness -- phi must beat its own average to show it uses x_T."""
    decode = phi.config.schedule.decode
    if phi.config.num_classes == 0:
        mean = decode(phi.raw(x_T, labels).mean(0, keepdim=True))
        return _fixed(Schedule(mean.grid[0], mean.shift[0], mean.scale[0]))
    raw = phi.raw(x_T, labels)
    raws = torch.stack([raw[labels == k].mean(0) if bool((labels == k).any()) else raw.mean(0)
                        for k in range(phi.config.num_classes)])
    return lambda x, c: decode(raws[c])


def add_controls(record: dict, tb: Testbed, heads_dir: Path, cache_dir: str) -> dict:
    """Measure the global schedules derived after tuning, where a cell lacks them: :data:`MEAN_ROW` (from the
    cell's saved phi, averaged over the tuning seeds' x_T) and :data:`GITS_ROW` (dynamic programming on the
    first 256 tuning seeds; its grid saved as ``<stem>_gits.json``). Each gets its paired standard error
    against the saved phi (``se_vs_phi``), as do such rows measured without one where the schedule can be
    rebuilt (the saved phi; the saved GITS grid). Then update the cell's best global method."""
    nfe = record["nfe"]
    bench = Bench(tb, nfe, samples=record["samples"], cache_dir=cache_dir, progress=False)
    rows, fns = dict(record["rows"]), {}
    x_T, labels = bench.setup.cache().inputs(torch.arange(record.get("train", tb.num_train)))
    phi = load_phi(heads_dir, tb, nfe) if _phi_path(heads_dir, tb, nfe).exists() else None
    if MEAN_ROW not in rows and phi is None:
        raise FileNotFoundError(f"no saved phi for {tb.name} NFE {nfe} under {heads_dir}")
    if phi is not None and "se_vs_phi" not in rows.get(MEAN_ROW, {}):
        fns[MEAN_ROW] = mean_schedule(phi, x_T, labels)
    gits_file = _grid_path(heads_dir, tb, nfe, "gits")
    if GITS_ROW not in rows:
        t = time.perf_counter()
        grid = fit_gits(bench.model, x_T[:256], nfe=nfe, sigma_min=tb.sigma_min, sigma_max=tb.sigma_max,
                        labels=None if labels is None else labels[:256])
        fns[GITS_ROW] = _fixed(Schedule(grid))
        bench.log(f"GITS grid in {time.perf_counter() - t:.0f} s")
    elif phi is not None and "se_vs_phi" not in rows[GITS_ROW] and gits_file.exists():
        fns[GITS_ROW] = _fixed(_load_grid(gits_file, tb, nfe))
    if phi is not None and fns:  # phi's per-seed errors, for the paired standard errors
        bench.measure("INDIS phi", phi, "indis")
        if not math.isclose(bench.rows["INDIS phi"]["mse"], rows["INDIS phi"]["mse"], rel_tol=1e-5):
            raise ValueError(f"the saved phi of {tb.name} NFE {nfe} gives teacher MSE "
                             f"{bench.rows['INDIS phi']['mse']:.6g} on the held-out seeds, the cell says "
                             f"{rows['INDIS phi']['mse']:.6g}: {heads_dir} holds another run's heads")
    for name, fn in fns.items():
        bench.measure(name, fn, "global")
        rows[name] = bench.rows[name]
        if "INDIS phi" in bench.losses:
            diff = bench.losses[name] - bench.losses["INDIS phi"]
            rows[name]["se_vs_phi"] = float(diff.std() / math.sqrt(len(diff)))
    if GITS_ROW in fns:
        _save_grid(heads_dir, tb, nfe, "gits", fns[GITS_ROW](x_T, labels), rows[GITS_ROW])
    best = min((k for k, r in rows.items() if r["kind"] == "global"), key=lambda k: rows[k]["mse"])
    grids = dict(record["grids"])
    if best in fns:
        grids["best_global"] = _grids(fns[best], bench.held)
    return {**record, "rows": rows, "best_global": best, "grids": grids}


def needs_controls(record: dict, tb: Testbed, heads_dir: Path, paired_se: bool = True) -> bool:
    """Whether :func:`add_controls` has something to add to the cell: a missing control row, or (with
    ``paired_se``) a paired standard error it can compute (the cell's phi is saved; for GITS also its
    grid)."""
    rows, nfe = record["rows"], record["nfe"]
    if MEAN_ROW not in rows or GITS_ROW not in rows:
        return True
    if not paired_se or not _phi_path(heads_dir, tb, nfe).exists():
        return False
    return "se_vs_phi" not in rows[MEAN_ROW] or ("se_vs_phi" not in rows[GITS_ROW]
                                                 and _grid_path(heads_dir, tb, nfe, "gits").exists())


def run_cell(tb: Testbed, nfe: int, *, samples: int, cache_dir: str, heads_dir: Path,
             progress: bool = True) -> dict:
    """Tune every method for ``tb`` at ``nfe`` and measure it on held-out seeds; returns the cell record."""
    torch.manual_seed(0)
    bench = Bench(tb, nfe, samples=samples, cache_dir=cache_dir, progress=progress)
    model, log = bench.model, bench.log
    log("teacher end points of the tuning seeds")
    train, val = bench.setup.data(progress=progress)
    train_eval = train.subset(torch.arange(min(len(train), samples)))
    common = dict(nfe=nfe, solver=tb.solver, shape=tb.shape, sigma_min=tb.sigma_min, sigma_max=tb.sigma_max,
                  num_classes=tb.num_classes, backbone=tb.name, data=(train, val))
    bench.heuristics()
    t = time.perf_counter()
    ld3 = fit_global(model, **common, fit_config=tb.ld3)
    bench.measure("LD3-global", _fixed(ld3), "global", time.perf_counter() - t)
    t = time.perf_counter()
    phi = fit_predictor(model, **common, pool=tb.pool, fit_config=tb.phi, blind_config=tb.blind)
    wall_phi = time.perf_counter() - t
    blind, blind_s = blind_ablation(phi, model, (train, val), tb)
    bench.measure("phi blind (ablation)", blind, "global", blind_s, train_eval)
    bench.measure("INDIS phi", phi, "indis", wall_phi, train_eval)
    t = time.perf_counter()
    noss = fit_predictor(model, **common, pool=tb.pool, fit_config=tb.phi, blind_config=tb.blind,
                         shift_bound=0.0, scale_bound=0.0)
    bench.measure(NOSS_ROW, noss, "ablation", time.perf_counter() - t, train_eval)
    extra: dict = {"train": len(train), "val": len(val), "threads": torch.get_num_threads(),
                   "start": phi.start, "fit_configs": fit_configs(tb),
                   "phi_fit": [r.__dict__ | {"history": []} for r in phi.fit_results]}
    if not tb.images and nfe == 3:
        log("exhaustive pure-grid search and per-instance oracles")
        ex = exhaustive_grids(model, bench.held, tb)
        bench.measure("best pure grid (exhaustive)", _fixed(Schedule(torch.tensor(ex["global_grid"]))),
                      "global")
        bench.rows["oracle pure grid (exhaustive)"] = {"mse": ex["oracle"], "mse_sum": 2 * ex["oracle"],
                                                       "kind": "oracle"}
        extra["exhaustive"] = ex
        n = len(bench.held)
        cfg = FitConfig(steps=400, batch_size=n, lr=0.05, clip=None, patience=10**9, progress=False)
        oracle = fit_oracle(model, bench.held, phi.config, cfg, base=blind.base)
        bench.measure("oracle phi-capacity (Adam)", lambda x, c: oracle(x, c, torch.arange(n)), "oracle",
                      batch_size=n)
    _save_heads(heads_dir, tb, nfe, phi, blind, noss, ld3, bench.rows)
    return bench.record(**extra)


def fit_configs(tb: Testbed) -> dict[str, dict]:
    """The optimiser settings that tune ``tb``'s heads (blind stage, phi, LD3), as a cell records them."""
    return {name: {k: v for k, v in asdict(getattr(tb, name)).items() if k != "progress"}
            for name in ("blind", "phi", "ld3")}


@torch.no_grad()
def _grids(fn: ScheduleFn, data: TuningData, n: int = 64) -> list[list[float]]:
    s = fn(data.x_T[:n], None if data.labels is None else data.labels[:n])
    g = s.grid if s.grid.dim() == 2 else s.grid.expand(min(n, len(data)), -1)
    return g.tolist()


def _head_stem(tb: Testbed, nfe: int) -> str:
    return f"{tb.name}_{tb.solver}_nfe{nfe}"


def load_phi(heads_dir: Path, tb: Testbed, nfe: int) -> Predictor:
    """The INDIS head :func:`run_cell` saved for ``tb`` at ``nfe`` (checked against NFE, solver, backbone)."""
    path = _phi_path(heads_dir, tb, nfe)
    if not path.exists():
        raise FileNotFoundError(f"no INDIS head {path} "
                                f"(python -m indis.engine.studies.quality --testbeds {tb.name})")
    return Predictor.load(path, nfe=nfe, solver=tb.solver, backbone=tb.name).eval()


def _save_heads(heads_dir: Path, tb: Testbed, nfe: int, phi: Predictor, blind: Predictor, noss: Predictor,
                ld3: Schedule, rows: dict) -> None:
    heads_dir.mkdir(parents=True, exist_ok=True)
    stem = _head_stem(tb, nfe)
    for tag, head, row in (("phi", phi, "INDIS phi"), ("blind", blind, "phi blind (ablation)"),
                           ("phi_noss", noss, NOSS_ROW)):
        head.save(heads_dir / f"{stem}_{tag}.safetensors", held_out=rows[row])
    _save_grid(heads_dir, tb, nfe, "ld3", ld3, rows["LD3-global"])
    _grid_path(heads_dir, tb, nfe, "gits").unlink(missing_ok=True)  # an older run's: add_controls refits it


def _phi_path(heads_dir: Path, tb: Testbed, nfe: int) -> Path:
    return Path(heads_dir) / f"{_head_stem(tb, nfe)}_phi.safetensors"


def _grid_path(heads_dir: Path, tb: Testbed, nfe: int, tag: str) -> Path:
    return Path(heads_dir) / f"{_head_stem(tb, nfe)}_{tag}.json"


def _save_grid(heads_dir: Path, tb: Testbed, nfe: int, tag: str, schedule: Schedule, row: dict) -> None:
    """A global schedule as ``<stem>_<tag>.json`` (grid, shift; the format ``indis generate --schedule``
    reads) with its held-out row."""
    heads_dir.mkdir(parents=True, exist_ok=True)
    d = {"grid": schedule.grid.tolist(), "shift": None if schedule.shift is None else schedule.shift.tolist(),
         "solver": tb.solver, "backbone": tb.name, "held_out": row}
    _grid_path(heads_dir, tb, nfe, tag).write_text(json.dumps(d, indent=1))


def _load_grid(path: Path, tb: Testbed, nfe: int) -> Schedule:
    """A schedule :func:`_save_grid` wrote, checked against ``tb``'s backbone and solver and ``nfe``."""
    d = json.loads(path.read_text())
    if d["solver"] != tb.solver or d["backbone"] != tb.name or len(d["grid"]) != nfe + 1:
        raise ValueError(f"{path} is for {d['backbone']} / {d['solver']} / NFE {len(d['grid']) - 1}, "
                         f"expected {tb.name} / {tb.solver} / NFE {nfe}")
    shift = None if d["shift"] is None else torch.tensor(d["shift"], dtype=torch.float64)
    return Schedule(torch.tensor(d["grid"], dtype=torch.float64), shift)


def load_heads(heads_dir: Path, tb: Testbed, nfe: int) -> dict[str, ScheduleFn] | None:
    """The heads :func:`run_cell` saved for ``tb`` at ``nfe`` (phi, blind, phi_noss, ld3), or None if any is
    missing. Checkpoints are checked against the NFE, solver and backbone."""
    stem = heads_dir / _head_stem(tb, nfe)
    paths = {tag: Path(f"{stem}_{tag}.safetensors") for tag in ("phi", "blind", "phi_noss")}
    ld3_path = _grid_path(heads_dir, tb, nfe, "ld3")
    if not ld3_path.exists() or not all(p.exists() for p in paths.values()):
        return None
    heads: dict[str, ScheduleFn] = {tag: Predictor.load(p, nfe=nfe, solver=tb.solver, backbone=tb.name).eval()
                                    for tag, p in paths.items()}
    heads["ld3"] = _fixed(_load_grid(ld3_path, tb, nfe))
    return heads


def _logger(prefix: str) -> Callable[[str], None]:
    t0 = time.perf_counter()
    return lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {prefix}: {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ reporting
def gain(record: dict, metric: str = "mse") -> float:
    """INDIS phi's change against the best global method on ``metric`` (negative = INDIS better)."""
    rows = record["rows"]
    best = min(r[metric] for r in rows.values() if r["kind"] == "global" and metric in r)
    return rows["INDIS phi"][metric] / best - 1


def teacher_fd_to_data(tb: Testbed, record: dict, cache_dir: str) -> float:
    """FD between the teacher end points of a cell's held-out seeds and the data: the floor for FD to data
    (teacher shards the cache lacks are computed first)."""
    model, space = tb.load(), tb.space()
    if space is None:
        raise ValueError(f"{tb.name} does not make images: no FD")
    cache = tb.tuning_setup(model, record["nfe"], cache_dir).cache()
    seeds = range(*record["held_out_seeds"])
    cache.build(model, seeds, progress=False)
    return space.fd_to_data(cache.load(seeds).x0)


VERSUS = {GITS_ROW: "GITS", "LD3-global": "LD3-global", AYS_ROW: "AYS", MEAN_ROW: "phi's mean schedule",
          NOSS_ROW: "phi without shift/scale"}


def markdown(records: list[dict], teacher_fd: dict[str, float] | None = None) -> str:
    """One table per testbed (methods x NFE) plus a summary of INDIS against the best global method;
    ``teacher_fd``: the teacher's own FD to data per testbed (a reference line under its table)."""
    lines = ["## Summary: INDIS phi vs the best global schedule (heuristics, AYS, LD3-global, GITS, phi's "
             "blind ablation, phi's own mean schedule; on the tree also the exhaustive best grid)", "",
             "| testbed | NFE | held-out seeds | best global (teacher MSE) | teacher MSE | FD to teacher | "
             "FD to data | teacher MSE vs blind ablation only |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        fd = [f"{100 * gain(r, m):+.1f} %" if "fd_data" in r["rows"]["INDIS phi"] else "–"
              for m in ("fd_teacher", "fd_data")]
        vs_blind = r["rows"]["INDIS phi"]["mse"] / r["rows"]["phi blind (ablation)"]["mse"] - 1
        best = r["rows"][r["best_global"]]
        mse = f"{100 * gain(r):+.1f} %"
        if "se_vs_phi" in best:
            mse += f" (± {100 * best['se_vs_phi'] / best['mse']:.2g} % paired s.e.)"
        lines.append(f"| {r['testbed']} | {r['nfe']} | {r['samples']} | {r['best_global']} | "
                     f"{mse} | {fd[0]} | {fd[1]} | {100 * vs_blind:+.1f} % |")
    versus_cols = " | ".join(f"vs {v}" for v in VERSUS.values())
    lines += ["", "## INDIS phi against the published global schedules, its own mean schedule and its "
              "ablation without shift/scale (teacher MSE; FD to data where defined)", "",
              f"| testbed | NFE | INDIS phi | {versus_cols} | FD to data: phi / GITS |",
              "|---" * (4 + len(VERSUS)) + "|"]
    for r in records:
        rows, phi = r["rows"], r["rows"]["INDIS phi"]
        versus = " | ".join(f"{100 * (phi['mse'] / rows[m]['mse'] - 1):+.1f} %" if m in rows else "–"
                            for m in VERSUS)
        fd = phi.get("fd_data"), rows.get(GITS_ROW, {}).get("fd_data")
        fd = "–" if None in fd else f"{fd[0]:.4g} / {fd[1]:.4g}"
        lines.append(f"| {r['testbed']} | {r['nfe']} | {phi['mse']:.4g} | {versus} | {fd} |")
    for name in dict.fromkeys(r["testbed"] for r in records):
        cells = [r for r in records if r["testbed"] == name]
        images = "fd_data" in cells[0]["rows"]["INDIS phi"]
        cols = ("mse", "psnr", "fd_teacher", "fd_data", "train_mse") if images else ("mse", "mse_sum",
                                                                                      "train_mse")
        heads = {"mse": "teacher MSE", "psnr": "PSNR dB", "fd_teacher": "FD→teacher", "fd_data": "FD→data",
                 "mse_sum": "MSE summed over coords", "train_mse": "train MSE"}
        r0 = cells[0]
        nfes = "/".join(str(c["nfe"]) for c in cells)
        tuning = f", tuning seeds {r0['train']} + {r0['val']} validation" if "train" in r0 else ""
        lines += ["", f"## {name} ({r0['solver']}, teacher {_teacher_name(r0)}, "
                  f"{r0['samples']} held-out seeds{tuning}); each cell: NFE {nfes}", "",
                  "| method | " + " | ".join(heads[k] for k in cols) + " |", "|---" * (1 + len(cols)) + "|"]
        for method in r0["rows"]:
            vals = [" / ".join(f"{c['rows'][method][k]:.4g}" if k in c["rows"].get(method, {}) else "–"
                               for c in cells) for k in cols]
            vals = ["–" if set(v.split(" / ")) == {"–"} else v for v in vals]
            lines.append(f"| {method} | " + " | ".join(vals) + " |")
        if teacher_fd and name in teacher_fd:
            lines.append(f"\nThe teacher's own FD to data on these seeds: {teacher_fd[name]:.4g}.")
        tune = " / ".join(f"NFE {c['nfe']}: {c['rows']['INDIS phi']['tune_s']:.0f} s" for c in cells
                          if c["rows"]["INDIS phi"].get("tune_s"))
        if tune:
            threads = r0.get("threads", "1-2")
            lines.append(f"\nTuning wall time of phi (blind stage + phi stage, {threads} CPU threads): "
                         f"{tune}.")
        if "exhaustive" in r0:
            lines.append(_tree_summary(r0))
    return "\n".join(lines) + "\n"


def _teacher_name(record: dict) -> str:
    t = record["teacher"]
    return "exact ODE (DOP853)" if t["solver"] == "exact" else f"{t['solver']} {t['steps']} steps"


def _tree_summary(r: dict) -> str:
    rows = r["rows"]
    best_global = min(v["mse"] for v in rows.values() if v["kind"] == "global")
    oracle = rows["oracle phi-capacity (Adam)"]["mse"]
    phi = rows["INDIS phi"]["mse"]
    ex = r["exhaustive"]
    recovered = (best_global - phi) / (best_global - oracle) if best_global > oracle else float("nan")
    return (f"\nPer-instance oracles: pure grid (exhaustive over {ex['points']} log-spaced points per "
            f"interior step) {ex['oracle']:.4g} vs best pure grid {ex['global']:.4g} "
            f"({100 * (ex['oracle'] / ex['global'] - 1):+.1f} %); with phi's Δτ/γ bounds (Adam) {oracle:.4g} "
            f"vs best global {best_global:.4g} ({100 * (oracle / best_global - 1):+.1f} %). Learned phi "
            f"recovers {100 * recovered:.0f} % of that oracle's gain.")


def plots(records: list[dict], out: Path) -> list[Path]:
    """Quality vs NFE per testbed, and a fan of phi's per-instance grids against the best global grid."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'indis[plot]')")
        return []
    written = []
    image_beds = list(dict.fromkeys(r["testbed"] for r in records if len(_cells(records, r["testbed"])) > 1))
    if image_beds:
        fig, axes = plt.subplots(1, len(image_beds), figsize=(4.5 * len(image_beds), 3.8), squeeze=False)
        for ax, name in zip(axes[0], image_beds, strict=True):
            cells = _cells(records, name)
            for method in cells[0]["rows"]:
                nfes = [c["nfe"] for c in cells if method in c["rows"]]
                ax.plot(nfes, [c["rows"][method]["mse"] for c in cells if method in c["rows"]], marker="o",
                        lw=2.5 if method == "INDIS phi" else 1, label=method)
            ax.set(title=name, xlabel="NFE", ylabel="teacher MSE (held-out)", yscale="log")
        axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        written.append(out / "quality_vs_nfe.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    for name in dict.fromkeys(r["testbed"] for r in records):
        cells = _cells(records, name)
        fig, axes = plt.subplots(1, len(cells), figsize=(4 * len(cells), 3.6), squeeze=False)
        for ax, c in zip(axes[0], cells, strict=True):
            for g in c["grids"]["phi"]:
                log_sigma = [math.log(s) for s in g if s > 0]
                ax.plot(range(len(log_sigma)), log_sigma, color="C0", alpha=0.15, lw=0.8)
            log_sigma = [math.log(s) for s in c["grids"]["best_global"][0] if s > 0]
            ax.plot(range(len(log_sigma)), log_sigma, "k--", lw=1.5, label=c["best_global"])
            ax.set(title=f"{name}, NFE {c['nfe']}", xlabel="step n", ylabel="log sigma_n")
            ax.legend(fontsize=6)
        fig.tight_layout()
        written.append(out / f"grid_fan_{name}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def sample_pictures(tb: Testbed, nfes: list[int], heads_dir: Path, cache_dir: str, out: Path,
                    n: int = 16, zoom: int = 2) -> Path | None:
    """``out/samples_<testbed>.png``: the first ``n`` held-out seeds, one per column; the first row is the
    teacher, then for each NFE in ``nfes`` a row of GITS and a row of INDIS phi (the cells' saved grid and
    head). None (nothing written) for a testbed that is not images or where a cell lacks its GITS grid or
    phi."""
    if not tb.images or not nfes or not all(_grid_path(heads_dir, tb, nfe, "gits").exists()
                                            and _phi_path(heads_dir, tb, nfe).exists() for nfe in nfes):
        return None
    from indis.engine.generation import image_grid, write_png

    model, seeds = tb.load(), range(HELD_OUT, HELD_OUT + n)
    cache = tb.tuning_setup(model, nfes[0], cache_dir).cache()
    cache.build(model, seeds, progress=False)
    held = cache.load(seeds)
    rows = [held.x0]
    for nfe in nfes:
        rows += [generate(_fixed(_load_grid(_grid_path(heads_dir, tb, nfe, "gits"), tb, nfe)), model, held,
                          tb.solver),
                 generate(load_phi(heads_dir, tb, nfe), model, held, tb.solver)]
    image = image_grid(torch.cat(rows).float(), columns=n)
    path = out / f"samples_{tb.name}.png"
    write_png(path, image.repeat(zoom, 0).repeat(zoom, 1))
    return path


def _cells(records: list[dict], name: str) -> list[dict]:
    return sorted((r for r in records if r["testbed"] == name), key=lambda r: r["nfe"])


# ------------------------------------------------------------------------------------------------ command
SHIPPED = {"digits-unet", "fashion-unet"}  # testbeds whose heads --ship copies (backbones users sample)


def override(tb: Testbed, *, steps: int | None = None, blind_steps: int | None = None,
             lbfgs_steps: int | None = None, ld3_steps: int | None = None, batch: int | None = None,
             train: int | None = None, val: int | None = None) -> Testbed:
    """``tb`` with other tuning settings (None keeps a setting): phi's optimiser steps, the blind stage's Adam
    and L-BFGS steps, LD3's steps, every head's batch, the numbers of tuning and validation seeds."""
    phi, blind, ld3 = tb.phi, tb.blind, tb.ld3
    if steps is not None:
        phi = replace(phi, steps=steps)
    if blind_steps is not None:
        blind = replace(blind, steps=blind_steps)
    if lbfgs_steps is not None:
        blind = replace(blind, lbfgs_steps=lbfgs_steps)
    if ld3_steps is not None:
        ld3 = replace(ld3, steps=ld3_steps)
    if batch is not None:
        phi, blind, ld3 = (replace(c, batch_size=batch) for c in (phi, blind, ld3))
    return replace(tb, phi=phi, blind=blind, ld3=ld3, num_train=tb.num_train if train is None else train,
                   num_val=tb.num_val if val is None else val)


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)  # a cell file is complete or absent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m indis.engine.studies.quality",
                                description=__doc__.splitlines()[0])
    p.add_argument("--testbeds", nargs="+", choices=tuple(TESTBEDS), default=list(DEFAULT_TESTBEDS))
    p.add_argument("--nfe", type=int, nargs="+", default=None, help="override each testbed's NFE list")
    p.add_argument("--samples", type=int, default=1024, help="held-out seeds per cell")
    p.add_argument("--steps", type=int, default=None, help="override phi's optimiser steps per stage")
    p.add_argument("--blind-steps", type=int, default=None, help="override the blind stage's Adam steps")
    p.add_argument("--lbfgs-steps", type=int, default=None,
                   help="override the blind stage's L-BFGS iterations (FitConfig.lbfgs_steps)")
    p.add_argument("--ld3-steps", type=int, default=None, help="override LD3-global's optimiser steps")
    p.add_argument("--batch", type=int, default=None, help="override the batch of every head's optimiser")
    p.add_argument("--train", type=int, default=None, help="override the number of tuning seeds")
    p.add_argument("--val", type=int, default=None, help="override the number of validation seeds")
    p.add_argument("--out", default="benchmarks/results/quality")
    p.add_argument("--cache", default=".indis-cache/teacher")
    p.add_argument("--force", action="store_true", help="recompute cells that are already written")
    p.add_argument("--report-only", action="store_true",
                   help="tabulate the cells already written; tune nothing")
    p.add_argument("--ship", type=Path, default=None, metavar="DIR",
                   help="also copy the heads of these testbeds' backbones (digits-unet, fashion-unet) into "
                        "DIR (the repository's engine/weights/indis holds the shipped ones)")
    a = p.parse_args(argv)
    lowest = {"samples": 2, "batch": 1, "train": 2, "val": 2}  # FD and standard errors need two samples
    for flag in ("samples", "steps", "blind_steps", "lbfgs_steps", "ld3_steps", "batch", "train", "val"):
        value = getattr(a, flag)
        if value is not None and value < lowest.get(flag, 0):
            p.error(f"--{flag.replace('_', '-')} {value}: at least {lowest.get(flag, 0)}")
    if any(n < 1 for n in a.nfe or ()):
        p.error(f"--nfe {a.nfe}: each NFE at least 1")
    if a.samples > DEVELOPMENT - HELD_OUT:
        p.error(f"--samples {a.samples}: held-out seeds would run into the development seeds")
    testbeds = {name: override(TESTBEDS[name](), steps=a.steps, blind_steps=a.blind_steps,
                               lbfgs_steps=a.lbfgs_steps, ld3_steps=a.ld3_steps, batch=a.batch, train=a.train,
                               val=a.val) for name in a.testbeds}
    if any(tb.num_train + tb.num_val > HELD_OUT for tb in testbeds.values()):
        p.error("the tuning and validation seeds (--train, --val) would run into the held-out seeds")
    if a.ship and not set(a.testbeds) & SHIPPED:
        p.error(f"--ship copies the heads of {sorted(SHIPPED)}; none of them is among --testbeds")
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    out = Path(a.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    records = []
    for name, tb in testbeds.items():
        for nfe in a.nfe or tb.nfes:
            path = out / "cells" / f"{name}_nfe{nfe}.json"
            if path.exists() and not a.force:
                print(f"{name} NFE {nfe}: reusing {path}")
            elif a.report_only:
                print(f"{name} NFE {nfe}: no cell at {path}, left out of the report")
                continue
            else:
                _write_json(path, run_cell(tb, nfe, samples=a.samples, cache_dir=a.cache,
                                           heads_dir=out / "heads"))
            rec = json.loads(path.read_text())
            if rec.get("fit_configs") != fit_configs(tb):
                made = "unrecorded" if "fit_configs" not in rec else "other"
                print(f"{name} NFE {nfe}: WARNING: {path} was tuned under {made} optimiser settings than "
                      "these (--force recomputes it)")
            if (rec.get("train"), rec.get("val")) not in ((tb.num_train, tb.num_val), (None, None)):
                print(f"{name} NFE {nfe}: WARNING: {path} was tuned on {rec['train']} + {rec['val']} seeds, "
                      f"not {tb.num_train} + {tb.num_val} (--force recomputes it)")
            if needs_controls(rec, tb, out / "heads", paired_se=not a.report_only):
                rec = add_controls(rec, tb, out / "heads", a.cache)
                _write_json(path, rec)
            records.append(rec)
    teacher_fd = {r["testbed"]: teacher_fd_to_data(TESTBEDS[r["testbed"]](), r, a.cache) for r in records
                  if "fd_data" in r["rows"]["INDIS phi"]}
    text = markdown(records, teacher_fd)
    (out / "quality.md").write_text(text)
    print(text)
    pictures = [sample_pictures(tb, [r["nfe"] for r in _cells(records, name)], out / "heads", a.cache, out)
                for name, tb in testbeds.items()]
    for f in plots(records, out) + [f for f in pictures if f is not None]:
        print(f"wrote {f}")
    for (name, tb), f in zip(testbeds.items(), pictures, strict=True):
        if f is None and tb.images:
            print(f"{name}: no samples picture (it needs each cell's saved phi and GITS grid in "
                  f"{out / 'heads'})")
    if a.ship:
        a.ship.mkdir(parents=True, exist_ok=True)
        for name in sorted(set(a.testbeds) & SHIPPED):
            for f in sorted((out / "heads").glob(f"{name}_*")):
                shutil.copy2(f, a.ship / f.name)
                print(f"shipped {a.ship / f.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
