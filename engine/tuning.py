"""Tuning schedule heads against a frozen backbone: INDIS (Yuan et al., 2026) and LD3 (Tong et al., 2025).

The student is the few-step solver unrolled with the head's per-sample schedule (``sampling.sample`` is
differentiable in the grid, shift and scale); gradients flow through the frozen backbone into the head. The
loss compares student and teacher end points in data space (L2, L1 or pseudo-Huber), plus an optional
feature distance. One loop (:func:`fit`) trains every head -- phi, its blind ablation, the per-instance oracle
and LD3's global grid -- with Adam (RMSprop for LD3) and a cosine learning rate, gradient clipping after
backward, a validation split, early stopping and the best checkpoint kept. Under ``torch.distributed`` the
head is wrapped in DDP and every global batch is split across ranks (gloo on CPU, nccl on GPU).

LD3's "soft teacher": each training sample's input may move inside an L2 ball of radius ``0.001 * d / N^2``
(d = numel of a sample, in N(0, I) noise units) around its x_T; a proposed move is kept per sample only if
that sample's loss drops.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .predictor import PerInstanceSchedule, Predictor, PredictorConfig, ScheduleConfig
from .sampling import sample
from .schedules import Schedule
from .teacher import TeacherCache, TeacherSpec, TuningData

Loss = Literal["l2", "l1", "huber"]
DEFAULT_TEACHER = TeacherSpec()  # iPNDM, 30 EDM steps


@dataclass
class FitConfig:
    """Optimisation settings shared by every head. ``steps`` counts optimiser steps."""

    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    lr_final: float = 0.01          # cosine decay to lr * lr_final
    weight_decay: float = 0.0
    optimizer: Literal["adam", "rmsprop"] = "adam"
    clip: float | None = 1.0        # max gradient norm, applied after backward
    loss: Loss = "l2"
    feature_weight: float = 0.0     # weight of the feature distance (needs a feature network)
    val_every: int = 20
    patience: int = 10              # validation checks without improvement before stopping
    soft_teacher: bool = False      # LD3's ball around x_T
    soft_radius: float | None = None  # default 0.001 * d / N^2
    seed: int = 0
    progress: bool = True


@dataclass
class FitResult:
    """What :func:`fit` did: the loss history, the best validation point and the wall time."""

    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_val: float = math.inf
    init_val: float = math.inf
    wall_s: float = 0.0
    stopped_early: bool = False


def sample_loss(student: Tensor, teacher: Tensor, kind: Loss) -> Tensor:
    """Per-sample distance ``[B]`` in data space: mean squared / mean absolute error, or pseudo-Huber
    ``sqrt(mse + c^2) - c`` with ``c = 0.00054`` (Song & Dhariwal 2023's ``0.00054 * sqrt(d)`` on the summed
    squared error, expressed per dimension)."""
    err = (student - teacher).flatten(1)
    if kind == "l2":
        return err.square().mean(1)
    if kind == "l1":
        return err.abs().mean(1)
    if kind == "huber":
        c = 0.00054
        return torch.sqrt(err.square().mean(1) + c * c) - c
    raise ValueError(f"loss={kind!r} is unknown; choose l2, l1 or huber")


def unroll(head: nn.Module, model: Callable[..., Tensor], x_T: Tensor, labels: Tensor | None, solver: str,
           index: Tensor | None = None, x_in: Tensor | None = None, **solver_opts) -> Tensor:
    """Student end points: the head's schedule for ``x_T`` (``x_in`` -- LD3's moved input -- is solved)."""
    schedule = head(x_T, labels, index)
    cond = None if labels is None else {"class_labels": labels}
    return sample(model, x_T if x_in is None else x_in, schedule, solver, cond=cond, **solver_opts)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(head: nn.Module, model: Callable[..., Tensor], data: TuningData, solver: str, loss: Loss = "l2",
             batch_size: int = 256, per_instance: bool = False, **solver_opts) -> Tensor:
    """Per-sample losses ``[M]`` of ``head`` on ``data`` (the oracle indexes its own rows)."""
    out = []
    for a in range(0, len(data), batch_size):
        idx = torch.arange(a, min(a + batch_size, len(data)))
        d = data.subset(idx)
        x = unroll(head, model, d.x_T, d.labels, solver, idx if per_instance else None, **solver_opts)
        out.append(sample_loss(x, d.x0, loss))
    return torch.cat(out)


def fit(head: nn.Module, model: Callable[..., Tensor], train: TuningData, val: TuningData | None,
        solver: str, cfg: FitConfig | None = None,
        feature_net: Callable[[Tensor], Tensor] | None = None, **solver_opts) -> FitResult:
    """Tune ``head`` on ``train`` by unrolling ``solver``; keep the state with the best validation loss.

    A :class:`PerInstanceSchedule` is fitted on ``train`` itself (its rows are the training samples) and
    validated on it. Under ``torch.distributed`` each rank unrolls its share of every global batch.
    """
    cfg = cfg or FitConfig()
    rank, world = _rank_world()
    per_instance = isinstance(head, PerInstanceSchedule)
    if per_instance:
        val = train
    module = head
    if world > 1:
        module = nn.parallel.DistributedDataParallel(head)
    params = [p for p in head.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1),
                                                       eta_min=cfg.lr * cfg.lr_final)
    gen = torch.Generator().manual_seed(cfg.seed)  # same stream on every rank: same global batches
    n, shape = len(train), train.x_T.shape[1:]
    nfe = head.config.schedule.nfe
    radius_eps = cfg.soft_radius if cfg.soft_radius is not None else 0.001 * math.prod(shape) / nfe ** 2
    radius = radius_eps / head.config.input_scale  # noise units -> state units (x_T = s(sigma_max) * eps)
    delta = torch.zeros_like(train.x_T) if cfg.soft_teacher else None

    def val_loss() -> float:
        if val is None:
            return math.nan
        losses = evaluate(head, model, val, solver, cfg.loss, per_instance=per_instance, **solver_opts)
        return float(losses.mean())

    result = FitResult()
    t0 = time.perf_counter()
    best_state = copy.deepcopy(head.state_dict())
    result.init_val = result.best_val = val_loss()
    checks_since_best = 0
    from tqdm.auto import tqdm

    bar = tqdm(range(1, cfg.steps + 1), desc=f"fit {type(head).__name__}", disable=not cfg.progress or rank)
    for step in bar:
        batch = torch.randperm(n, generator=gen)[:cfg.batch_size] if cfg.batch_size < n else torch.arange(n)
        local = batch[rank::world]
        d = train.subset(local)
        x_in = None
        if delta is not None:
            x_in = (d.x_T + delta[local]).requires_grad_(True)
        index = local if per_instance else None
        student = unroll(module, model, d.x_T, d.labels, solver, index, x_in, **solver_opts)
        losses = sample_loss(student, d.x0, cfg.loss)
        loss = losses.mean()
        if cfg.feature_weight and feature_net is not None:
            feat = (feature_net(student) - feature_net(d.x0)).square().sum(1).mean()
            loss = loss + cfg.feature_weight * feat
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        if delta is not None:
            _soft_teacher_move(head, model, d, local, delta, x_in, losses.detach(), radius, solver, cfg.loss,
                               solver_opts)
        record = {"step": step, "train": float(loss.detach())}
        if step % cfg.val_every == 0 or step == cfg.steps:
            v = val_loss()
            record["val"] = v
            if v < result.best_val or math.isnan(result.best_val):
                result.best_val, result.best_step, checks_since_best = v, step, 0
                best_state = copy.deepcopy(head.state_dict())
            else:
                checks_since_best += 1
            bar.set_postfix(train=f"{record['train']:.4g}", val=f"{v:.4g}", best=f"{result.best_val:.4g}")
            if checks_since_best >= cfg.patience:
                result.history.append(record)
                result.stopped_early = True
                break
        result.history.append(record)
    head.load_state_dict(best_state)
    result.wall_s = time.perf_counter() - t0
    return result


def _soft_teacher_move(head: nn.Module, model: Callable[..., Tensor], d: TuningData, local: Tensor,
                       delta: Tensor, x_in: Tensor, losses: Tensor, radius: float, solver: str, loss: Loss,
                       solver_opts: dict) -> None:
    """LD3's soft teacher: step each input against its gradient, project onto the ball, keep improvements."""
    g = x_in.grad
    if g is None:
        return
    g = g.flatten(1)
    step = -radius * g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    proposal = delta[local].flatten(1) + step
    norm = proposal.norm(dim=1, keepdim=True)
    proposal = (proposal * torch.clamp(radius / norm.clamp_min(1e-30), max=1.0)).view_as(delta[local])
    with torch.no_grad():
        student = unroll(head, model, d.x_T, d.labels, solver, None, d.x_T + proposal, **solver_opts)
        better = sample_loss(student, d.x0, loss) < losses
    delta[local[better]] = proposal[better]


# --------------------------------------------------------------------------------------- public entry points
@dataclass(frozen=True)
class TuningSetup:
    """Backbone, data and solver a head is tuned for: what ``fit_predictor`` / ``fit_global`` share."""

    model: Callable[..., Tensor]
    schedule: ScheduleConfig
    solver: str
    shape: tuple[int, ...]
    backbone: str = ""
    num_classes: int = 0
    teacher: TeacherSpec = DEFAULT_TEACHER
    num_train: int = 1024
    num_val: int = 256
    cache_dir: str = ".indis-cache/teacher"
    shard_size: int = 256
    dtype: torch.dtype = torch.float32
    solver_opts: dict = field(default_factory=dict)

    def cache(self) -> TeacherCache:
        s = self.schedule
        return TeacherCache(self.cache_dir, backbone=self.backbone, shape=self.shape, sigma_min=s.sigma_min,
                            sigma_max=s.sigma_max, family=s.family, final_zero=s.final_zero,
                            teacher=self.teacher, num_classes=self.num_classes, shard_size=self.shard_size,
                            dtype=self.dtype)

    def data(self, progress: bool = True) -> tuple[TuningData, TuningData]:
        """Train seeds ``[0, num_train)``, validation seeds after them; teacher shards split across ranks."""
        rank, world = _rank_world()
        cache = self.cache()
        seeds = range(0, self.num_train + self.num_val)
        cache.build(self.model, seeds, rank=rank, world_size=world, progress=progress and rank == 0)
        if world > 1:
            dist.barrier()
        device = next((p.device for p in getattr(self.model, "parameters", list)()), None)
        train = cache.load(range(0, self.num_train), device)
        val = cache.load(range(self.num_train, self.num_train + self.num_val), device)
        return train, val


def fit_predictor(model: Callable[..., Tensor], *, nfe: int, solver: str, shape: tuple[int, ...],
                  sigma_min: float, sigma_max: float, family: str = "ve", space: str = "lambda",
                  init: str = "edm", final_zero: bool = False, shift_bound: float = 0.1,
                  scale_bound: float = 0.05, num_classes: int = 0, backbone: str = "", hidden: int = 128,
                  depth: int = 2, pool: int | None = None, blind: bool = False, staged: bool = True,
                  teacher: TeacherSpec = DEFAULT_TEACHER, num_train: int = 1024, num_val: int = 256,
                  cache_dir: str = ".indis-cache/teacher", fit_config: FitConfig | None = None,
                  blind_config: FitConfig | None = None, data: tuple[TuningData, TuningData] | None = None,
                  init_grid: Tensor | None = None, **solver_opts) -> Predictor:
    """Tune an INDIS predictor phi(x_T, c) for ``model`` at ``nfe`` steps of ``solver``.

    With ``staged`` (default) the blind schedule (grid, Δτ, γ without instance input; per class when the
    predictor is conditional) is tuned first and phi starts from it exactly, so phi can only improve on the
    best blind schedule its tuning finds. phi's initial weights are drawn from ``fit_config.seed``.
    ``init_grid`` ``[N+1]`` (e.g. a GITS grid) replaces the ``init`` heuristic as the start. The returned
    predictor carries ``fit_results`` (blind stage, phi stage) and ``blind`` (the tuned blind head,
    or None).
    """
    sc = ScheduleConfig(nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max, family=family, space=space,
                        init=init, final_zero=final_zero, shift_bound=shift_bound, scale_bound=scale_bound)
    pc = PredictorConfig(sc, solver, tuple(shape), backbone=backbone, hidden=hidden, depth=depth, pool=pool,
                         blind=blind, num_classes=num_classes)
    setup = TuningSetup(model, sc, solver, tuple(shape), backbone, num_classes, teacher, num_train, num_val,
                        cache_dir, solver_opts=solver_opts)
    train, val = data if data is not None else setup.data()
    cfg = fit_config or FitConfig()
    base = None if init_grid is None else sc.raw_from_grid(init_grid)
    results = []
    blind_head = None
    if staged and not blind:
        blind_head = Predictor(PredictorConfig(**{**pc.__dict__, "blind": True}), base=base)
        results.append(fit(blind_head, model, train, val, solver, blind_config or _blind_config(cfg),
                           **solver_opts))
    head = phi_from_blind(pc, blind_head, cfg.seed, base)
    results.append(fit(head, model, train, val, solver, cfg, **solver_opts))
    head.fit_results = results
    object.__setattr__(head, "blind", blind_head)  # a plain attribute, not a submodule in the checkpoint
    return head.eval()


def phi_from_blind(config: PredictorConfig, blind: Predictor | None, seed: int = 0,
                   base: Tensor | None = None) -> Predictor:
    """A fresh phi (weights drawn from ``seed``) that returns exactly ``blind``'s schedule: its base and, for
    a conditional blind head, its condition path; the x_T input starts at zero. ``blind=None``: the
    raw vector ``base`` (default: the heuristic of ``config``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = Predictor(config, base=base if blind is None else blind.base)
    if blind is not None and blind.out is not None and head.x_in is not None:
        head.load_state_dict(blind.state_dict(), strict=False)
        nn.init.zeros_(head.x_in.weight)
        nn.init.zeros_(head.x_in.bias)
    return head


def _blind_config(cfg: FitConfig) -> FitConfig:
    return FitConfig(**{**cfg.__dict__, "lr": max(cfg.lr, 1e-2), "weight_decay": 0.0})


def fit_global(model: Callable[..., Tensor], *, nfe: int, solver: str, shape: tuple[int, ...],
               sigma_min: float, sigma_max: float, family: str = "ve", space: str = "lambda",
               init: str = "edm", final_zero: bool = False, shift_bound: float = 0.1, num_classes: int = 0,
               backbone: str = "", teacher: TeacherSpec = DEFAULT_TEACHER, num_train: int = 50,
               num_val: int = 50,
               cache_dir: str = ".indis-cache/teacher", fit_config: FitConfig | None = None,
               data: tuple[TuningData, TuningData] | None = None, init_grid: Tensor | None = None,
               **solver_opts) -> Schedule:
    """LD3-global (Tong et al., ICLR 2025): one grid of N+1 logits plus decoupled evaluation offsets (the
    shift), tuned with the soft teacher and RMSprop(lr 0.005) on 50 + 50 samples (its published defaults);
    from ``init_grid`` if given, else from the ``init`` heuristic.

    Returns a shared :class:`Schedule` (grid ``[N+1]``, shift ``[N]``) that ``indis.sample`` accepts.
    """
    sc = ScheduleConfig(nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max, family=family, space=space,
                        init=init, final_zero=final_zero, shift_bound=shift_bound, scale_bound=0.0)
    pc = PredictorConfig(sc, solver, tuple(shape), backbone=backbone, blind=True)
    setup = TuningSetup(model, sc, solver, tuple(shape), backbone, num_classes, teacher, num_train, num_val,
                        cache_dir, solver_opts=solver_opts)
    train, val = data if data is not None else setup.data()
    cfg = fit_config or FitConfig(steps=300, batch_size=num_train, lr=0.005, optimizer="rmsprop",
                                  soft_teacher=True, clip=None, patience=10**9)
    head = Predictor(pc, base=None if init_grid is None else sc.raw_from_grid(init_grid))
    result = fit(head, model, train, val, solver, cfg, **solver_opts)
    s = head(train.x_T[:1]).detach()
    out = Schedule(s.grid[0], s.shift[0] if shift_bound else None, None)
    object.__setattr__(out, "fit_result", result)
    return out


@torch.no_grad()
def fit_gits(model: Callable[..., Tensor], x_T: Tensor, *, nfe: int, sigma_min: float, sigma_max: float,
             fine_steps: int = 60, labels: Tensor | None = None) -> Tensor:
    """GITS (Chen et al., ICML 2024) by dynamic programming: the ``[N+1]`` subset of a fine EDM grid whose
    summed one-step (Euler) errors against a fine teacher trajectory of ``x_T`` are smallest.

    The trajectory is iPNDM on ``fine_steps`` EDM steps; the cost of a coarse step i -> j is the mean squared
    distance between the Euler step from the trajectory's state at sigma_i and its state at sigma_j. For
    k-diffusion-convention (VE) models, whose state is x0 + sigma * eps.
    """
    if not 1 <= nfe <= fine_steps:
        raise ValueError(f"need 1 <= nfe <= fine_steps, got nfe={nfe}, fine_steps={fine_steps}")
    from .schedules import get_sigmas

    fine = get_sigmas("edm", fine_steps, sigma_min, sigma_max, device=x_T.device)
    states, denoised = [x_T], []

    def record(d: dict) -> None:
        states.append(d["x"])
        denoised.append(d["raw"])

    sample(model, x_T, fine, "ipndm", cond=None if labels is None else {"class_labels": labels},
           callback=record)
    k = fine_steps + 1
    cost = torch.full((k, k), math.inf, dtype=torch.float64)
    for i in range(fine_steps):
        x, d = states[i].double(), denoised[i].double()
        slope = (x - d) / fine[i]
        for j in range(i + 1, k):
            cost[i, j] = (x + (fine[j] - fine[i]) * slope - states[j].double()).square().mean()
    best = torch.full((nfe + 1, k), math.inf, dtype=torch.float64)  # best[n, j]: n steps from 0 to j
    back = torch.zeros((nfe + 1, k), dtype=torch.long)
    best[0, 0] = 0.0
    for n in range(1, nfe + 1):
        total = best[n - 1].unsqueeze(1) + cost  # [i, j]
        best[n], back[n] = total.min(0)
    path = [k - 1]
    for n in range(nfe, 0, -1):
        path.append(int(back[n, path[-1]]))
    return fine[torch.tensor(path[::-1])]


def fit_oracle(model: Callable[..., Tensor], data: TuningData, config: PredictorConfig,
               cfg: FitConfig | None = None, base: Tensor | None = None,
               **solver_opts) -> PerInstanceSchedule:
    """The per-instance oracle: a schedule fitted separately for every sample of ``data`` (full batch)."""
    head = PerInstanceSchedule(config, len(data), base)
    cfg = cfg or FitConfig(steps=300, batch_size=len(data), lr=0.05, patience=10**9, clip=None)
    head.fit_result = fit(head, model, data, None, config.solver, cfg, **solver_opts)
    return head


__all__ = ["FitConfig", "FitResult", "TuningSetup", "evaluate", "fit", "fit_gits", "fit_global", "fit_oracle",
           "fit_predictor", "phi_from_blind", "sample_loss", "unroll"]
