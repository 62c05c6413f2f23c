"""Tuning schedule heads against a frozen backbone: INDIS (Yuan et al., 2026) and LD3 (Tong et al., 2025).

The student is the few-step solver unrolled with the head's per-sample schedule (``sampling.sample`` is
differentiable in the grid, shift and scale); gradients flow through the frozen backbone into the head. The
loss compares student and teacher end points in data space (L2, L1 or pseudo-Huber), plus an optional
feature distance. One loop (:func:`fit`) trains every head -- phi, its blind ablation, the per-instance oracle
and LD3's global grid -- with Adam (RMSprop for LD3) and a cosine learning rate, gradient clipping after
backward, a validation split and, per :class:`FitConfig` ``keep``, the best checkpoint with early stopping
or the final state; heads with a handful of parameters (the blind schedule) may then finish with full-batch
L-BFGS (Nocedal & Wright, 2006, Alg. 7.5; strong-Wolfe line search). Under ``torch.distributed`` the
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
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from indis.engine.core.conditions import Cond
from indis.engine.core.families import FAMILIES, NoiseFamily, as_denoiser, get_family
from indis.engine.core.guidance import guidance_key
from indis.engine.core.predictor import (
    HEURISTICS,
    PerInstanceSchedule,
    Predictor,
    PredictorConfig,
    ScheduleConfig,
)
from indis.engine.core.sampling import check_solver, sample
from indis.engine.core.schedules import Schedule, get_sigmas
from indis.engine.tuning.teacher import Conditions, TeacherCache, TeacherSpec, TuningData

Loss = Literal["l2", "l1", "huber"]
DEFAULT_TEACHER = TeacherSpec()  # iPNDM, 30 EDM steps
INITS = ("auto", *HEURISTICS)


@dataclass(frozen=True)
class FitConfig:
    """Optimisation settings shared by every head. ``steps`` counts optimiser steps.

    ``keep="best"`` returns the state with the lowest validation loss (the initial state included) and stops
    after ``patience`` checks without improvement: the guard for heads with many parameters (phi).
    ``keep="last"`` runs every step and returns the final state of the cosine decay, validation only
    recorded: for heads with a handful of parameters (the blind schedule), where picking the best of many
    noisy validation checks selects noise -- per-sample errors are heavy-tailed -- rather than a better state.

    ``lbfgs_steps`` > 0 (``keep="last"`` only) continues from the last Adam state with that many L-BFGS
    iterations on the whole training split (strong-Wolfe line search, at most ``1.5 * lbfgs_steps`` loss and
    gradient evaluations of the split): Adam's noisy steps choose the basin, L-BFGS converges in it.
    """

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
    patience: int = 10              # validation checks without improvement before stopping ("best" only)
    keep: Literal["best", "last"] = "best"  # the state returned: best validation loss, or the final one
    lbfgs_steps: int = 0            # full-batch L-BFGS iterations after the Adam steps ("last" only)
    soft_teacher: bool = False      # LD3's ball around x_T
    soft_radius: float | None = None  # default 0.001 * d / N^2
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.keep not in ("best", "last"):
            raise ValueError(f"keep={self.keep!r} is unknown; choose best or last")
        for name in ("batch_size", "val_every", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("steps", "lbfgs_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 0")
        if self.lbfgs_steps and (self.keep != "last" or self.soft_teacher):
            raise ValueError("lbfgs_steps needs keep='last' and no soft teacher (a fixed full-batch "
                             "objective)")


#: Default optimisation of phi's stage and of the blind stage before it. phi's from the convergence curves of
#: ``benchmarks/indis_convergence.py``; the blind stage's budget, learning rate, kept state (the last) and
#: L-BFGS finish (Adam alone converges slowly on some mixtures at NFE 5) from
#: ``benchmarks/indis_blind_stage.py`` on development seeds and mixtures.
PHI_FIT = FitConfig(steps=600, batch_size=64, lr=1e-3, val_every=25)
BLIND_FIT = FitConfig(steps=600, batch_size=64, lr=2e-2, val_every=100, keep="last", lbfgs_steps=30)


@dataclass
class FitResult:
    """What :func:`fit` did: the loss history, the kept state's step and validation loss (``best_step``,
    ``best_val``: the best validation point, or the final step with ``keep="last"``) and the wall time."""

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


def unroll(head: nn.Module, model: Callable[..., Tensor], x_T: Tensor, head_cond: Tensor | None, solver: str,
           index: Tensor | None = None, x_in: Tensor | None = None, cond: Cond | None = None,
           **solver_opts) -> Tensor:
    """Student end points: the head's schedule for ``x_T`` and its condition ``head_cond`` (``x_in`` --
    LD3's moved input -- is solved); the model receives ``cond`` (default: ``head_cond`` as class labels)."""
    schedule = head(x_T, head_cond, index)
    if cond is None and head_cond is not None:
        if head_cond.is_floating_point():
            raise ValueError("a float head condition is not class labels: pass the model's inputs as cond")
        cond = {"class_labels": head_cond}
    return sample(model, x_T if x_in is None else x_in, schedule, solver, cond=cond, **solver_opts)


def unroll_data(head: nn.Module, model: Callable[..., Tensor], d: TuningData, solver: str,
                index: Tensor | None = None, x_in: Tensor | None = None, **solver_opts) -> Tensor:
    """:func:`unroll` on tuning data: its x_T, the head's condition and the model's inputs."""
    return unroll(head, model, d.x_T, d.head_cond(), solver, index, x_in, d.model_cond(), **solver_opts)


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
        x = unroll_data(head, model, d, solver, idx if per_instance else None, **solver_opts)
        out.append(sample_loss(x, d.x0, loss))
    return torch.cat(out)


def fit(head: nn.Module, model: Callable[..., Tensor], train: TuningData, val: TuningData | None,
        solver: str, cfg: FitConfig | None = None,
        feature_net: Callable[[Tensor], Tensor] | None = None, **solver_opts) -> FitResult:
    """Tune ``head`` on ``train`` by unrolling ``solver``; return the state ``cfg.keep`` names (the best
    validation loss, or the last step's).

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
    best_state = copy.deepcopy(head.state_dict()) if cfg.keep == "best" else None
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
        student = unroll_data(module, model, d, solver, index, x_in, **solver_opts)
        losses = sample_loss(student, d.x0, cfg.loss)
        loss = losses.mean()
        feat = _feature_distance(student, d.x0, cfg, feature_net)
        if feat is not None:
            loss = loss + cfg.feature_weight * feat.mean()
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
            if cfg.keep == "last":
                if step == cfg.steps:
                    result.best_val, result.best_step = v, step
            elif v < result.best_val or math.isnan(result.best_val):
                result.best_val, result.best_step, checks_since_best = v, step, 0
                best_state = copy.deepcopy(head.state_dict())
            else:
                checks_since_best += 1
            shown = {"best": f"{result.best_val:.4g}"} if cfg.keep == "best" else {}
            bar.set_postfix(train=f"{record['train']:.4g}", val=f"{v:.4g}", **shown)
            if cfg.keep == "best" and checks_since_best >= cfg.patience:
                result.history.append(record)
                result.stopped_early = True
                break
        result.history.append(record)
    if cfg.lbfgs_steps:
        loss, evals = _lbfgs_finish(head, model, train, solver, cfg, per_instance, feature_net, rank, world,
                                    solver_opts)
        result.best_val, result.best_step = val_loss(), cfg.steps + cfg.lbfgs_steps
        result.history.append({"step": result.best_step, "train": loss, "val": result.best_val,
                               "lbfgs_evaluations": evals})
    if cfg.keep == "best":
        head.load_state_dict(best_state)
    result.wall_s = time.perf_counter() - t0
    return result


def _feature_distance(student: Tensor, x0: Tensor, cfg: FitConfig,
                      feature_net: Callable[[Tensor], Tensor] | None) -> Tensor | None:
    """Per-sample squared distance of student and teacher end points in ``feature_net``'s features (the
    paper's perceptual term's stand-in), or None when ``cfg`` gives the term no weight."""
    if not cfg.feature_weight or feature_net is None:
        return None
    return (feature_net(student) - feature_net(x0)).square().sum(1)


LBFGS_CHUNK = 256  # samples unrolled at once while accumulating a full-batch gradient


def _lbfgs_finish(head: nn.Module, model: Callable[..., Tensor], train: TuningData, solver: str,
                  cfg: FitConfig, per_instance: bool, feature_net: Callable[[Tensor], Tensor] | None,
                  rank: int, world: int, solver_opts: dict) -> tuple[float, int]:
    """``cfg.lbfgs_steps`` L-BFGS iterations on the Adam steps' objective averaged over all of ``train``
    (each rank unrolls its share; gradients and loss are summed across ranks, so every rank takes the same
    step). Returns the last evaluated loss and the number of evaluations."""
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=cfg.lbfgs_steps,
                            max_eval=math.ceil(1.5 * cfg.lbfgs_steps), line_search_fn="strong_wolfe")
    n = len(train)
    local = torch.arange(rank, n, world)
    evals, last = 0, math.nan
    from tqdm.auto import tqdm

    bar = tqdm(total=opt.defaults["max_eval"], desc="fit L-BFGS", disable=not cfg.progress or rank)

    def closure() -> Tensor:
        nonlocal evals, last
        opt.zero_grad(set_to_none=False)
        total = torch.zeros((), dtype=torch.float64, device=params[0].device)  # nccl reduces device tensors
        for chunk in local.split(LBFGS_CHUNK):
            d = train.subset(chunk)
            index = chunk if per_instance else None
            student = unroll_data(head, model, d, solver, index, **solver_opts)
            loss = sample_loss(student, d.x0, cfg.loss).sum() / n
            feat = _feature_distance(student, d.x0, cfg, feature_net)
            if feat is not None:
                loss = loss + cfg.feature_weight * feat.sum() / n
            loss.backward()
            total += loss.detach().double()
        if world > 1:
            for p in params:
                if p.grad is not None:  # same on every rank: the same head unrolled on the same kind of rows
                    dist.all_reduce(p.grad)
            dist.all_reduce(total)
        evals, last = evals + 1, float(total)
        bar.update()
        bar.set_postfix(train=f"{last:.4g}")
        return total

    opt.step(closure)
    bar.close()
    return last, evals


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
        student = unroll_data(head, model, d, solver, None, d.x_T + proposal, **solver_opts)
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
    num_val: int = 512
    cache_dir: str = ".indis-cache/teacher"
    shard_size: int = 256
    dtype: torch.dtype = torch.float32
    solver_opts: dict = field(default_factory=dict)
    conditions: Conditions | None = None
    conditions_key: str = ""

    def cache(self) -> TeacherCache:
        s = self.schedule
        return TeacherCache(self.cache_dir, backbone=self.backbone, shape=self.shape, sigma_min=s.sigma_min,
                            sigma_max=s.sigma_max, family=s.family, final_zero=s.final_zero,
                            teacher=self.teacher, num_classes=self.num_classes, shard_size=self.shard_size,
                            dtype=self.dtype, conditions=self.conditions, conditions_key=self.conditions_key,
                            guidance=guidance_key(self.model))

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
                  sigma_min: float, sigma_max: float, family: str | None = None, space: str = "lambda",
                  init: str = "auto", final_zero: bool = False, shift_bound: float = 0.1,
                  scale_bound: float = 0.05, num_classes: int = 0, backbone: str = "", hidden: int = 128,
                  depth: int = 2, pool: int | None = None, blind: bool = False, staged: bool = True,
                  teacher: TeacherSpec = DEFAULT_TEACHER, num_train: int = 1024, num_val: int = 512,
                  cache_dir: str = ".indis-cache/teacher", fit_config: FitConfig | None = None,
                  blind_config: FitConfig | None = None, data: tuple[TuningData, TuningData] | None = None,
                  init_grid: Tensor | None = None, shrink: bool = True, cond_dim: int = 0,
                  conditions: Conditions | None = None, conditions_key: str = "", **solver_opts) -> Predictor:
    """Tune an INDIS predictor phi(x_T, c) for ``model`` at ``nfe`` steps of ``solver``.

    The start: ``init="auto"`` (default) is the best global grid found cheaply on the tuning seeds
    (:func:`start_grid`: GITS and the four heuristics, measured on the teacher); a heuristic name starts from
    that heuristic; ``init_grid`` ``[N+1]`` from a given grid. With ``staged`` (default) the blind schedule
    (grid, Δτ, γ without instance input; per class when the predictor is conditional) is tuned from there
    first (``blind_config``; default :data:`BLIND_FIT` -- or, when only ``fit_config`` is given, its batch,
    loss and seed with BLIND_FIT's steps, kept state (the final one) and a learning rate of at least
    BLIND_FIT's) and phi (``fit_config``, default :data:`PHI_FIT`) starts from its final state exactly;
    phi's stage keeps its best validation state, so phi is never worse than that start on the validation
    seeds. phi's initial weights are drawn from ``fit_config.seed``. With ``shrink`` (default) an
    unconditional phi's instance part is then shrunk toward its mean schedule, to that one global
    schedule unless the instance part beats it on the validation seeds by more than two paired standard
    errors (:func:`shrink_toward_mean`). ``family`` defaults to the model's own (a :class:`Denoiser`'s family,
    VE for a plain callable); a different one is refused. The returned predictor carries ``start`` (the
    start grid, the candidates' teacher MSE and the shrink factor), ``fit_results`` (blind stage, phi stage)
    and ``blind`` (the tuned blind head, or None).

    Conditions beyond class labels (``num_classes``): ``conditions(seeds) -> (cond, phi_cond)`` gives each
    tuning seed the model's inputs (e.g. ``{"encoder_hidden_states": [M, L, D]}``) and phi's condition
    ``[M, cond_dim]`` (e.g. the pooled text embedding; the paper mean-pools T5 tokens and concatenates
    CLIP's pooled embedding), stored with the teacher end points under ``conditions_key``. Guidance: pass
    ``indis.guided(model, uncond, scale)`` as ``model``; teacher and student then sample with the same
    guidance (and it enters the teacher cache's key).
    """
    early = _schedule_config(model, nfe, sigma_min, sigma_max, family, space, init, final_zero, shift_bound,
                             scale_bound)  # this and the next line check the arguments before any tuning
    PredictorConfig(early, solver, tuple(shape), backbone=backbone, hidden=hidden, depth=depth, pool=pool,
                    blind=blind, num_classes=num_classes, cond_dim=cond_dim)
    check_solver(solver, solver_opts)
    sc, setup, (train, val), base, start = _prepare(
        model, nfe=nfe, solver=solver, shape=shape, sigma_min=sigma_min, sigma_max=sigma_max, family=family,
        space=space, init=init, final_zero=final_zero, shift_bound=shift_bound, scale_bound=scale_bound,
        num_classes=num_classes, backbone=backbone, teacher=teacher, num_train=num_train, num_val=num_val,
        cache_dir=cache_dir, data=data, init_grid=init_grid, solver_opts=solver_opts, conditions=conditions,
        conditions_key=conditions_key)
    if cond_dim and (train.phi_cond is None or train.phi_cond.shape[-1] != cond_dim):
        got = None if train.phi_cond is None else tuple(train.phi_cond.shape)
        raise ValueError(f"cond_dim={cond_dim}: the tuning data must carry phi's condition [M, {cond_dim}] "
                         f"(conditions(seeds) -> (cond, phi_cond)), got {got}")
    pc = PredictorConfig(sc, solver, tuple(shape), backbone=backbone, hidden=hidden, depth=depth, pool=pool,
                         blind=blind, num_classes=num_classes, cond_dim=cond_dim)
    cfg = fit_config or PHI_FIT
    results = []
    blind_head = None
    if staged and not blind:
        blind_head = Predictor(PredictorConfig(**{**pc.__dict__, "blind": True}), base=base)
        results.append(fit(blind_head, model, train, val, solver,
                           blind_config or blind_stage_config(fit_config), **solver_opts))
    head = phi_from_blind(pc, blind_head, cfg.seed, base)
    results.append(fit(head, model, train, val, solver, cfg, **solver_opts))
    if shrink and val is not None:
        start["shrink"] = shrink_toward_mean(head, model, train, val, solver, **solver_opts)
    head.fit_results, head.start = results, start
    object.__setattr__(head, "blind", blind_head)  # a plain attribute, not a submodule in the checkpoint
    return head.eval()


SHRINK_FACTORS = (1.0, 0.5, 0.0)


@torch.no_grad()
def shrink_toward_mean(head: Predictor, model: Callable[..., Tensor], train: TuningData, val: TuningData,
                       solver: str, factors: tuple[float, ...] = SHRINK_FACTORS, margin: float = 2.0,
                       **solver_opts) -> float:
    """Shrink an unconditional phi toward its own mean schedule: ``raw(x) -> m + a (raw(x) - m)``, with m the
    mean raw output over the tuning seeds ``train``. ``a = 0`` (one global schedule) is kept unless a factor
    beats it on the validation seeds by more than ``margin`` standard errors of the paired per-seed
    difference; among those that do, the one with the lowest validation loss (the first on ties). Folded into
    the weights exactly (``out`` scaled by ``a``, ``base`` moved by ``(1 - a)`` times the mean residual), so
    the head keeps its form. Returns ``a``; a conditional or blind head is left as it is (returns 1). A
    ``factors`` without 0 picks the lowest validation loss.

    phi's instance part is fitted to the tuning seeds; where it does not generalise, its mean -- a global
    schedule the phi stage found -- validates as well as phi itself. Per-seed errors are heavy-tailed, so a
    lower validation mean alone is weak evidence. The test is still optimistic (the same validation seeds
    chose phi's kept state, and several factors are tried): the margin is a guard, not a calibrated level.
    With fewer than 2 validation seeds no factor can pass; a factor passes against a non-finite a = 0 when
    its own losses are finite."""
    if not factors:
        raise ValueError("factors is empty; give at least one shrink factor")
    if not margin >= 0:
        raise ValueError(f"margin={margin} must be a non-negative number of standard errors")
    c = head.config
    if head.out is None or c.blind or c.num_classes or c.cond_dim:
        return 1.0
    mean_res = torch.cat([head.residual(train.x_T[i:i + 512], None, None).to(torch.float64)
                          for i in range(0, len(train), 512)]).mean(0)
    base, weight = head.base.detach().clone(), head.out.weight.detach().clone()
    losses = {}
    for a in factors:
        head.base.copy_(base + (1 - a) * mean_res)
        head.out.weight.copy_(weight * a)
        losses[a] = evaluate(head, model, val, solver, **solver_opts).double()
    candidates = list(factors)
    if 0.0 in losses:
        null = losses[0.0]
        candidates = [a for a in factors if a == 0.0 or _beats(losses[a], null, margin)]
    best = min(candidates, key=lambda a: float(losses[a].mean()))
    head.base.copy_(base + (1 - best) * mean_res)
    head.out.weight.copy_(weight * best)
    return best


def _beats(loss: Tensor, null: Tensor, margin: float) -> bool:
    """Whether per-seed losses ``loss`` undercut ``null``'s by more than ``margin`` paired standard errors."""
    if not torch.isfinite(null).all():
        return bool(torch.isfinite(loss).all())
    if len(loss) < 2:
        return False
    diff = null - loss
    return bool(diff.mean() > margin * diff.std() / math.sqrt(len(diff)))


def _schedule_config(model: Callable[..., Tensor], nfe: int, sigma_min: float, sigma_max: float,
                     family: str | None, space: str, init: str, final_zero: bool, shift_bound: float,
                     scale_bound: float) -> ScheduleConfig:
    """The schedule configuration of a tuning run (the family taken from the model); cheap, so it is built
    -- and its values checked -- before any teacher end point."""
    if init not in INITS:
        raise ValueError(f"init={init!r} is unknown; choose one of {INITS}")
    return ScheduleConfig(nfe=nfe, sigma_min=sigma_min, sigma_max=sigma_max,
                          family=model_family(model, family, space), space=space,
                          init="edm" if init == "auto" else init, final_zero=final_zero,
                          shift_bound=shift_bound, scale_bound=scale_bound)


def _prepare(model: Callable[..., Tensor], *, nfe: int, solver: str, shape: tuple[int, ...], sigma_min: float,
             sigma_max: float, family: str | None, space: str, init: str, final_zero: bool,
             shift_bound: float, scale_bound: float, num_classes: int, backbone: str, teacher: TeacherSpec,
             num_train: int, num_val: int, cache_dir: str, data: tuple[TuningData, TuningData] | None,
             init_grid: Tensor | None, solver_opts: dict, conditions: Conditions | None = None,
             conditions_key: str = ""):
    """What every tuning entry point does first: the schedule config (family from the model), the tuning
    data (teacher cache) and the start (``init``/``init_grid``) as a raw base vector."""
    sc = _schedule_config(model, nfe, sigma_min, sigma_max, family, space, init, final_zero, shift_bound,
                          scale_bound)
    setup = TuningSetup(model, sc, solver, tuple(shape), backbone, num_classes, teacher, num_train, num_val,
                        cache_dir, solver_opts=solver_opts, conditions=conditions,
                        conditions_key=conditions_key)
    train, val = data if data is not None else setup.data()
    if init_grid is not None:
        start = {"chosen": "init_grid", "candidates": {}}
    elif init == "auto":
        init_grid, start = start_grid(model, train, sc, solver, **solver_opts)
    else:
        init_grid, start = sc.init_grid(), {"chosen": f"heuristic {init}", "candidates": {}}
    start["grid"] = torch.as_tensor(init_grid, dtype=torch.float64).tolist()
    return sc, setup, (train, val), sc.raw_from_grid(init_grid), start


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


def blind_stage_config(phi: FitConfig | None) -> FitConfig:
    """The blind stage's default: :data:`BLIND_FIT`; given phi's settings, those (batch, loss, seed, ...) with
    the blind stage's budget, validation interval, kept state and L-BFGS finish, no soft teacher, and a
    learning rate of at least ``BLIND_FIT.lr``."""
    if phi is None:
        return BLIND_FIT
    return replace(phi, steps=BLIND_FIT.steps, val_every=BLIND_FIT.val_every, lr=max(phi.lr, BLIND_FIT.lr),
                   weight_decay=0.0, keep=BLIND_FIT.keep, lbfgs_steps=BLIND_FIT.lbfgs_steps,
                   soft_teacher=False)


def fit_global(model: Callable[..., Tensor], *, nfe: int, solver: str, shape: tuple[int, ...],
               sigma_min: float, sigma_max: float, family: str | None = None, space: str = "lambda",
               init: str = "auto", final_zero: bool = False, shift_bound: float = 0.1, num_classes: int = 0,
               backbone: str = "", teacher: TeacherSpec = DEFAULT_TEACHER, num_train: int = 50,
               num_val: int = 50,
               cache_dir: str = ".indis-cache/teacher", fit_config: FitConfig | None = None,
               data: tuple[TuningData, TuningData] | None = None, init_grid: Tensor | None = None,
               conditions: Conditions | None = None, conditions_key: str = "", **solver_opts) -> Schedule:
    """LD3-global (Tong et al., ICLR 2025): one grid of N+1 logits plus decoupled evaluation offsets (the
    shift), tuned with the soft teacher and RMSprop(lr 0.005) on 50 + 50 samples (its published defaults);
    started like :func:`fit_predictor` (``init="auto"``: the best of GITS and the heuristics on the tuning
    seeds; a heuristic name; or ``init_grid``); ``conditions`` as in :func:`fit_predictor`.

    Returns a shared :class:`Schedule` (grid ``[N+1]``, shift ``[N]``) that ``indis.sample`` accepts.
    """
    sc, setup, (train, val), base, start = _prepare(
        model, nfe=nfe, solver=solver, shape=shape, sigma_min=sigma_min, sigma_max=sigma_max, family=family,
        space=space, init=init, final_zero=final_zero, shift_bound=shift_bound, scale_bound=0.0,
        num_classes=num_classes, backbone=backbone, teacher=teacher, num_train=num_train, num_val=num_val,
        cache_dir=cache_dir, data=data, init_grid=init_grid, solver_opts=solver_opts, conditions=conditions,
        conditions_key=conditions_key)
    pc = PredictorConfig(sc, solver, tuple(shape), backbone=backbone, blind=True)
    cfg = fit_config or FitConfig(steps=300, batch_size=num_train, lr=0.005, optimizer="rmsprop",
                                  soft_teacher=True, clip=None, patience=10**9)
    head = Predictor(pc, base=base)
    result = fit(head, model, train, val, solver, cfg, **solver_opts)
    s = head(train.x_T[:1]).detach()
    out = Schedule(s.grid[0], s.shift[0] if shift_bound else None, None)
    object.__setattr__(out, "fit_result", result)
    object.__setattr__(out, "start", start)
    return out


@torch.no_grad()
def fit_gits(model: Callable[..., Tensor], x_T: Tensor, *, nfe: int, sigma_min: float, sigma_max: float,
             fine_steps: int = 60, labels: Tensor | None = None, final_zero: bool = False,
             cond: Cond | None = None) -> Tensor:
    """GITS (Chen et al., ICML 2024) by dynamic programming: the ``[N+1]`` subset of a fine EDM grid whose
    summed one-step (Euler) errors against a fine teacher trajectory of ``x_T`` are smallest.

    The trajectory is iPNDM on ``fine_steps`` EDM steps (uniform in the family's t when ``sigma_max`` is
    inf); the cost of a coarse step i -> j is the mean squared distance, in VE units (the family's state
    divided by its alpha at sigma_j), between the exact-exponential Euler (DDIM) step from the trajectory's
    state at sigma_i and its state at sigma_j -- so the grid does not depend on the family a model is
    wrapped in. Works for any :class:`~indis.engine.core.families.Denoiser` (VE, VP, flow; ``x_T`` in its
    coordinate). With ``final_zero`` the grid passes through ``sigma_min`` and ends with a step to 0.
    ``cond``: the model's condition inputs (default: ``labels`` as ``class_labels``).
    """
    if not 1 + final_zero <= nfe <= fine_steps:
        raise ValueError(f"need {1 + final_zero} <= nfe <= fine_steps, got nfe={nfe}, "
                         f"fine_steps={fine_steps}")
    den = as_denoiser(model)
    fam = den.family
    kind = "uniform_t" if math.isinf(sigma_max) else "edm"
    fine = get_sigmas(kind, fine_steps, sigma_min, sigma_max, family=fam, device=x_T.device)
    states, x0s = [], []  # the state at each fine grid point and the model's x0 estimate there

    def record(d: dict) -> None:
        states.append(d["x"])
        x0s.append(d["denoised"])

    if cond is None and labels is not None:
        cond = {"class_labels": labels}
    states.append(sample(den, x_T, fine, "ipndm", cond=cond, callback=record))
    alpha, s = fam.alpha(fine), fam.s(fine)
    k = fine_steps + 1
    cost = torch.full((k, k), math.inf, dtype=torch.float64)
    for i in range(fine_steps):
        y, x0 = states[i].double(), x0s[i].double()
        for j in range(i + 1, k):
            ratio = s[j] / s[i]
            step = ratio * y + (alpha[j] - alpha[i] * ratio) * x0
            cost[i, j] = ((step - states[j].double()) / alpha[j]).square().mean()
    steps = nfe - final_zero
    best = torch.full((steps + 1, k), math.inf, dtype=torch.float64)  # best[n, j]: n steps from 0 to j
    back = torch.zeros((steps + 1, k), dtype=torch.long)
    best[0, 0] = 0.0
    for n in range(1, steps + 1):
        total = best[n - 1].unsqueeze(1) + cost  # [i, j]
        best[n], back[n] = total.min(0)
    path = [k - 1]
    for n in range(steps, 0, -1):
        path.append(int(back[n, path[-1]]))
    grid = fine[torch.tensor(path[::-1], device=fine.device)]
    return torch.cat([grid, grid.new_zeros(1)]) if final_zero else grid


@torch.no_grad()
def start_grid(model: Callable[..., Tensor], data: TuningData, schedule: ScheduleConfig, solver: str,
               samples: int = 256, **solver_opts) -> tuple[Tensor, dict]:
    """The best global grid found cheaply on tuning seeds: GITS (:func:`fit_gits`) and the four heuristics,
    each measured by the teacher MSE of ``solver`` on the first ``samples`` seeds of ``data``.

    Returns the ``[N+1]`` grid and ``{"chosen": name, "candidates": {name: teacher MSE}}``.
    """
    d = data.subset(torch.arange(min(samples, len(data))))
    sc = schedule
    grids = {f"heuristic {h}": ScheduleConfig(**{**sc.__dict__, "init": h}).init_grid() for h in HEURISTICS}
    grids["GITS"] = fit_gits(model, d.x_T, nfe=sc.nfe, sigma_min=sc.sigma_min, sigma_max=sc.sigma_max,
                             final_zero=sc.final_zero, cond=d.model_cond()).cpu()
    cond = d.model_cond()
    scores = {name: float(sample_loss(sample(model, d.x_T, g.to(d.x_T.device), solver, cond=cond,
                                             **solver_opts), d.x0, "l2").mean())
              for name, g in grids.items()}
    chosen = min(scores, key=scores.get)
    return grids[chosen], {"chosen": chosen, "candidates": scores}


def model_family(model: Callable[..., Tensor], family: str | None = None, space: str = "lambda") -> str:
    """The noise family's name of ``model`` (a :class:`Denoiser`'s own, VE for a plain callable), checked
    against an explicit ``family``: a tuned head must start teacher and student from the model's x_T scale.

    A family without a registered name that scales the state like a registered one -- a diffusers VP model's
    ``VPDiscrete`` scales it like ``vp_linear`` -- takes that name, except in ``space="t"``, where the
    schedule is laid out in the family's own time (refused there)."""
    fam = as_denoiser(model).family
    name = next((n for n in FAMILIES if _same_family(get_family(n), fam)), None)
    same = _same_family if name is not None or space == "t" else _same_scaling
    if name is None and space != "t":
        name = next((n for n in FAMILIES if _same_scaling(get_family(n), fam)), None)
    if family is not None:
        if not same(get_family(family), fam):
            raise ValueError(f"family={family!r} does not match the model's noise family {fam!r}: teacher "
                             "and student would start from the wrong x_T scale; leave family unset to use "
                             "the model's")
        return family
    if name is None:
        hint = " or use space='lambda'" if space == "t" else ""
        raise ValueError(f"the model's noise family {fam!r} has no registered name ({sorted(FAMILIES)}) "
                         f"in space {space!r}, so a tuned head could not record it; wrap the network with "
                         f"one of those families{hint}")
    return name


def _same_family(a: NoiseFamily, b: NoiseFamily) -> bool:
    if type(a) is not type(b) or a.sigma_range != b.sigma_range:
        return False
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    return bool(torch.allclose(a.sigma(t), b.sigma(t), rtol=1e-12, atol=0))


def _same_scaling(a: NoiseFamily, b: NoiseFamily) -> bool:
    """Whether two families scale the state alike at every sigma (x_T and a grid in sigma mean the same)."""
    sigma = torch.logspace(-3, 3, 13, dtype=torch.float64)
    return all(bool(torch.allclose(f(sigma), g(sigma), rtol=1e-12, atol=0))
               for f, g in ((a.alpha, b.alpha), (a.s, b.s)))


def fit_oracle(model: Callable[..., Tensor], data: TuningData, config: PredictorConfig,
               cfg: FitConfig | None = None, base: Tensor | None = None,
               **solver_opts) -> PerInstanceSchedule:
    """The per-instance oracle: a schedule fitted separately for every sample of ``data`` (full batch)."""
    head = PerInstanceSchedule(config, len(data), base)
    cfg = cfg or FitConfig(steps=300, batch_size=len(data), lr=0.05, patience=10**9, clip=None)
    head.fit_result = fit(head, model, data, None, config.solver, cfg, **solver_opts)
    return head


__all__ = ["BLIND_FIT", "PHI_FIT", "FitConfig", "FitResult", "TuningSetup", "evaluate", "fit", "fit_gits",
           "fit_global", "fit_oracle", "fit_predictor", "model_family", "phi_from_blind", "sample_loss",
           "shrink_toward_mean", "start_grid", "unroll", "unroll_data"]
