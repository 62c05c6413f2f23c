"""Admission for a continuous batcher: requests in, plain data out.

:class:`Admission` validates each :class:`Request` through the same front door as ``indis.sample``
(``sampling.check_inputs``; x_T from a seed as ``teacher.initial_state``), resolves ``nfe="auto"`` and
``schedule="predictor"``, groups requests that can share one table build, and builds each group's
coefficient rows for the pool (``sampling.table_for`` + ``sampling.pool_layout``). A request whose inputs are
bad fails alone, before it takes a slot; a group whose table cannot be built fails as a group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from indis.engine.core.conditions import Cond, flatten, pick, unflatten
from indis.engine.core.families import Denoiser
from indis.engine.core.sampling import (
    check_inputs,
    check_schedule,
    check_solver,
    check_state,
    pool_layout,
    table_for,
)
from indis.engine.core.schedules import HEURISTICS, Schedule, get_sigmas
from indis.engine.core.solvers import SOLVERS
from indis.engine.serving.allocation import NFEChooser
from indis.engine.serving.pool import MAX_HISTORY
from indis.engine.tuning.teacher import draw_noise, noise_from_seeds, noise_scale


@dataclass
class Request:
    """One sample to generate.

    ``x_T`` (``[*shape]``, already at the grid's first noise level, in the model family's coordinate) or
    ``seed`` (``x_T = teacher.initial_state(noise_from_seeds(seed), sigma_max, family)``: ``sigma_max`` times
    the noise for VE, its VP / flow scaling otherwise); ``schedule``: a heuristic name (``edm``,
    ``logsnr``, ...), ``"predictor"`` (the batcher's INDIS predictor for this NFE and solver), an explicit
    ``[N+1]`` grid or a :class:`Schedule`; ``cond``: this sample's condition inputs, a (nested) dict of
    ints (class labels) and tensors without the batch axis (or with a batch axis of 1), e.g.
    ``{"class_labels": 3}`` or ``{"encoder_hidden_states": emb[77, 768]}``; None: none. Under a batcher with
    guidance, ``uncond`` (the unconditional inputs, e.g. a negative prompt's embeddings) and
    ``guidance_scale`` (a float) are required. ``nfe="auto"``:
    the batcher's :class:`~indis.engine.serving.allocation.NFEChooser` picks it from x_T (and the condition)
    at admission; the future then carries it as ``future.nfe``.
    """

    x_T: Tensor | None = None
    seed: int | None = None
    nfe: int | str = 5
    solver: str = "ipndm"
    schedule: str | Tensor | Schedule = "edm"
    cond: Cond | None = field(default_factory=dict)
    solver_opts: dict = field(default_factory=dict)
    uncond: Cond | None = None
    guidance_scale: float | None = None


@dataclass(frozen=True)
class TensorCondition:
    """A condition input a batcher takes as a tensor per request (e.g. text embeddings, ``shape=(77, 768)``),
    held in ``dtype``; an idle slot holds zeros."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


Condition = tuple[int, int] | TensorCondition  # an int range [low, high) or a tensor input


@dataclass(slots=True)
class Admitted:
    """A validated request as plain data: its x_T (float64, CPU), its schedule (a grid ``[N+1]`` with
    optional shift / scale ``[N]``, or the key of a cached heuristic table), its condition inputs by dotted
    path (and under guidance its unconditional inputs and scale) and the key of the group it can share a
    table build with."""

    nfe: int
    x_T: Tensor
    grid: Tensor | None
    shift: Tensor | None
    scale: Tensor | None
    cached: tuple | None
    cond: dict[str, Tensor]
    group: tuple
    uncond: dict[str, Tensor] | None = None
    guidance_scale: float | None = None


@dataclass(slots=True)
class Group:
    """Admitted requests of one table build, with the callers' handles (``owners``), their pool rows
    ``[g, max_stages, R]`` and network times ``[g, max_stages]`` (a single row, ``[1, ...]``: a cached
    heuristic table the whole group shares) and stage count."""

    owners: list
    members: list[Admitted]
    rows: Tensor
    time: Tensor
    stages: int


def opts_key(opts: dict) -> tuple:
    """A request's solver options as a hashable key (lists become tuples); ValueError for anything else
    unhashable or a non-string name."""
    if not isinstance(opts, dict) or not all(isinstance(k, str) for k in opts):
        raise ValueError(f"solver_opts={opts!r} must be a dict of option names to values")
    if not opts:
        return ()
    items = []
    for k, v in sorted(opts.items()):
        v = tuple(v) if isinstance(v, list) else v
        try:
            hash(v)
        except TypeError:
            raise ValueError(f"solver option {k}={v!r} must be a number, string, bool or list") from None
        kind = tuple(type(e).__name__ for e in v) if isinstance(v, tuple) else type(v).__name__
        items.append((k, kind, v))  # 2 and 2.0 (or 1 and True) hash alike but are different options
    return tuple(items)


def _empty(cond: object) -> bool:
    """Whether a request's ``cond`` gives no condition input (None or an empty dict)."""
    return cond is None or (isinstance(cond, dict) and not cond)


def valid_seed(seed: object) -> bool:
    """Whether ``seed`` is an int a generator takes, in ``[0, 2**64)``."""
    return isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**64


def describe(e: BaseException) -> str:
    """``"Type: message"`` of an exception, even one whose ``str`` fails."""
    try:
        return f"{type(e).__name__}: {e}"
    except Exception:  # noqa: BLE001 - a broken __str__ must not break error delivery
        return type(e).__name__


def as_value_error(e: Exception) -> ValueError:
    """A request's validation failure as ``ValueError`` (the original as its ``__cause__``)."""
    if isinstance(e, ValueError):
        return e
    error = ValueError(describe(e))
    error.__cause__ = e
    return error


class Admission:
    """Turns requests into :class:`Group` s for a pool of samples shaped ``shape`` in ``dtype`` on
    ``device`` holding ``max_stages`` stages (the batcher's arguments of the same names)."""

    def __init__(self, den: Denoiser, shape: Sequence[int], *, sigma_min: float, sigma_max: float,
                 predictors: dict[tuple[int, str], Callable],
                 predictor_cond: str | Callable[[Cond], Tensor] | None, chooser: NFEChooser | None,
                 conditions: dict[str, Condition], max_stages: int, device: torch.device,
                 dtype: torch.dtype, coef_dtype: torch.dtype, guidance: bool = False) -> None:
        self.den, self.shape = den, tuple(shape)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.predictors, self.predictor_cond, self.chooser = predictors, predictor_cond, chooser
        self.conditions, self.max_stages, self.guidance = conditions, max_stages, guidance
        self.device, self.dtype, self.coef_dtype = device, dtype, coef_dtype
        self.noise_scale = noise_scale(sigma_max, den.family)  # x_T = noise_scale * noise, as in tuning
        # A seed's noise is a normal draw from 32- or 64-bit uniforms, so |noise| < 64: its x_T can overflow
        # the pool's dtype only when noise_scale * 64 does, and only then is each one checked.
        self.check_seed_states = self.noise_scale * 64 > torch.finfo(dtype).max
        self.tables: dict[tuple, tuple[Tensor, Tensor, int]] = {}  # heuristic schedules: one table each
        self.noise_generator = torch.Generator()  # seed_states draws into one buffer with it
        self._grow_noise_buffer(0)

    def admit(self, batch: list[tuple[Request, object]], on_nfe: Callable[[object, int], None] | None = None
              ) -> tuple[list[Group], list[tuple[object, ValueError]]]:
        """Validate, group and build tables for ``(request, owner)`` pairs; returns the groups ready to
        place and the ``(owner, error)`` of every request that failed. ``on_nfe(owner, nfe)`` is told each
        NFE chosen for ``nfe="auto"``."""
        groups: dict[tuple, tuple[list, list[Admitted]]] = {}
        failed: list[tuple[object, ValueError]] = []
        for (req, owner), drawn in zip(batch, self.seed_states([req for req, _ in batch]), strict=True):
            try:
                nfe = req.nfe
                if nfe == "auto":
                    nfe = self.choose_nfe(req, drawn)
                    if on_nfe is not None:
                        on_nfe(owner, nfe)
                item = self.prepare(req, nfe, drawn)
            except Exception as e:  # noqa: BLE001 - bad inputs fail this request alone
                failed.append((owner, as_value_error(e)))
                continue
            owners, members = groups.setdefault(item.group, ([], []))
            owners.append(owner)
            members.append(item)
        ready = []
        for (solver, _, opts, *_), (owners, members) in groups.items():
            try:
                ready.append(Group(owners, members, *self.group_table(solver, {k: v for k, _, v in opts},
                                                                      members)))
            except Exception as e:  # noqa: BLE001 - e.g. a solver option error: the group fails
                error = as_value_error(e)
                failed += [(owner, error) for owner in owners]
        return ready, failed

    def prepare(self, req: Request, nfe: int | str | None = None, drawn: Tensor | None = None) -> Admitted:
        """Validate one request (the NFE bound first, before anything of the request's size is built);
        ``nfe``: the NFE already chosen for ``nfe="auto"`` (chosen here if None); ``drawn``: its seed's
        state from :meth:`seed_states` (drawn here if None)."""
        nfe = req.nfe if nfe is None else nfe
        nfe = self.choose_nfe(req, drawn) if nfe == "auto" else nfe
        if isinstance(nfe, bool) or not isinstance(nfe, int) or not 1 <= nfe <= self.max_stages:
            raise ValueError(f"nfe={nfe!r} must be an int in [1, {self.max_stages}] (this batcher's "
                             "max_stages)")
        x = self.initial_state(req, drawn)
        if self.conditions or self.guidance or not (_empty(req.cond) and req.uncond is None
                                                    and req.guidance_scale is None):
            cond = self.check_conditions(req)
            uncond, guidance_scale = self.check_guidance(req)
        else:  # the common request: none of these inputs, to a batcher that takes none
            cond, uncond, guidance_scale = {}, None, None
        if type(req.solver_opts) is dict and not req.solver_opts and req.solver in SOLVERS:
            opts = ()  # the common request: a known solver without options
        else:
            check_solver(req.solver, req.solver_opts)
            opts = opts_key(req.solver_opts)
        sched = req.schedule
        if isinstance(sched, str) and sched in HEURISTICS:  # the same table for every such request: cached
            key = (req.solver, nfe, sched, opts)
            if key not in self.tables:
                grid = get_sigmas(sched, nfe, self.sigma_min, self.sigma_max, family=self.den.family)
                check_schedule(self.den, grid[None], None, None, self.dtype, req.solver)
                self.tables[key] = self.table(req.solver, req.solver_opts, grid[None], None, None)
            return Admitted(nfe, x, None, None, None, key, cond, (req.solver, nfe, opts, False, False, key),
                            uncond, guidance_scale)
        if isinstance(sched, str) and sched == "predictor":
            phi = self.predictors.get((nfe, req.solver))
            if phi is None:
                raise ValueError(f"no predictor for NFE {nfe} and {req.solver}; "
                                 f"have {sorted(self.predictors)}")
            with torch.no_grad():
                sched = phi(x.to(self.device, torch.float32)[None], self.predictor_input(cond))
        if isinstance(sched, str):
            raise ValueError(f"schedule={sched!r}: use a heuristic {HEURISTICS}, 'predictor' or a grid")
        if isinstance(sched, Schedule):
            sched = Schedule(*(None if v is None else v.detach().to("cpu", torch.float64).reshape(1, -1)
                               for v in (sched.grid, sched.shift, sched.scale)))
        else:
            try:
                sched = torch.as_tensor(sched).detach().to("cpu", torch.float64).reshape(-1)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"schedule must be a heuristic name, 'predictor', a grid [N+1] or a "
                                 f"Schedule, got {type(sched).__name__}") from e
        grid, shift, scale = check_inputs(self.den, x[None].to(self.dtype), sched, req.solver,
                                          solver_opts=req.solver_opts)
        if grid.shape[-1] != nfe + 1:
            raise ValueError(f"the grid has {grid.shape[-1]} points; NFE {nfe} needs {nfe + 1}")
        if torch.isinf(grid[:, 0]).any():
            raise ValueError("a grid starting at sigma = inf (a flow model's t = 1) is not served here; "
                             "start at a finite sigma_max")
        shift, scale = (None if v is None else v[0] for v in (shift, scale))
        return Admitted(nfe, x, grid[0], shift, scale, None, cond,
                        (req.solver, nfe, opts, shift is not None, scale is not None, None), uncond,
                        guidance_scale)

    def seed_states(self, requests: Sequence[Request]) -> list[Tensor | None]:
        """The x_T of every request served by a valid seed, drawn together (``teacher.draw_noise`` into one
        reused buffer: the same rows as one draw each; one caller at a time, the batcher's loop); None for
        the others (:meth:`initial_state` says what is wrong with them)."""
        picked = []
        for i, r in enumerate(requests):
            try:
                if r.x_T is None and valid_seed(r.seed):
                    picked.append(i)
            except Exception:  # noqa: BLE001 - not a request at all: its own validation fails it alone
                continue
        out: list[Tensor | None] = [None] * len(requests)
        if picked:
            k = len(picked)
            if k > len(self.noise_rows):
                self._grow_noise_buffer(k)
            draw_noise(self.noise_rows[:k], [requests[i].seed for i in picked], self.noise_generator)
            # float64(noise) * noise_scale in one numpy call: teacher.initial_state's product, bit for bit
            states = torch.from_numpy(np.multiply(self.noise_buffer[:k], self.noise_scale, dtype=np.float64))
            for i, x in zip(picked, states.unbind(0), strict=True):
                out[i] = x
        return out

    def _grow_noise_buffer(self, rows: int) -> None:
        """A float32 buffer of ``rows`` samples for :meth:`seed_states` to draw into (its numpy view and row
        views, made once)."""
        buffer = torch.empty(rows, *self.shape, dtype=torch.float32)
        self.noise_buffer, self.noise_rows = buffer.numpy(), buffer.unbind(0)

    def initial_state(self, req: Request, drawn: Tensor | None = None) -> Tensor:
        """The request's validated x_T (given, or its seed's noise scaled to sigma_max in the model family's
        coordinate, as ``teacher.initial_state``; ``drawn``: that state, already drawn by
        :meth:`seed_states`), float64 on the CPU; finite in the pool's dtype."""
        if (req.x_T is None) == (req.seed is None):
            raise ValueError("give exactly one of x_T and seed")
        if req.x_T is None:
            if drawn is None and not valid_seed(req.seed):  # a drawn state's seed was valid
                raise ValueError(f"seed={req.seed!r} must be an int in [0, 2**64)")
            x = drawn if drawn is not None else (
                noise_from_seeds([req.seed], self.shape, dtype=torch.float64)[0] * self.noise_scale)
            if self.check_seed_states:
                check_state(x[None].to(self.dtype), f"x_T (seed {req.seed} at sigma_max {self.sigma_max})")
            return x
        try:
            x = torch.as_tensor(req.x_T).detach().to("cpu", torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"x_T must be a tensor of shape {self.shape} ({e})") from e
        if tuple(x.shape) != self.shape:
            raise ValueError(f"x_T has shape {tuple(x.shape)}, this batcher serves {self.shape}")
        check_state(x[None].to(self.dtype), "x_T")
        return x

    def check_conditions(self, req: Request, which: str = "cond") -> dict[str, Tensor]:
        """The request's validated condition inputs (``which``: ``"cond"`` or ``"uncond"``) by dotted path,
        one sample each (no batch axis) on the CPU (the pool moves them): every input this batcher takes, an
        int input left out holding its low value (a tensor input must be given)."""
        given = getattr(req, which)
        if not self.conditions and _empty(given):  # none
            return {}
        flat = flatten(given, which, leaves=(Tensor, int))
        out = {}
        for k in flat:
            if k not in self.conditions:
                raise ValueError(f"unknown condition {k!r}; this batcher takes {sorted(self.conditions)}")
        for k, spec in self.conditions.items():
            v = flat.get(k)
            if isinstance(spec, TensorCondition):
                if v is None:
                    raise ValueError(f"{which}[{k!r}] is required: a tensor of shape {spec.shape}")
                if not isinstance(v, Tensor) or tuple(v.shape) not in (spec.shape, (1, *spec.shape)):
                    got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                    raise ValueError(f"{which}[{k!r}] must be a tensor of shape {spec.shape}, got {got}")
                if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    raise ValueError(f"{which}[{k!r}] contains NaN or inf")
                out[k] = v.detach().reshape(spec.shape).to("cpu", spec.dtype)
                continue
            lo, hi = spec
            v = lo if v is None else v
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
                raise ValueError(f"condition {k}={v!r} must be an int in [{lo}, {hi})")
            out[k] = torch.tensor(v)
        return out

    def check_guidance(self, req: Request) -> tuple[dict[str, Tensor] | None, float | None]:
        """The request's unconditional inputs and guidance scale (required under guidance, refused
        without)."""
        if not self.guidance:
            if req.uncond is not None or req.guidance_scale is not None:
                raise ValueError("this batcher was built without guidance (guidance=False): do not pass "
                                 "uncond or guidance_scale")
            return None, None
        g = req.guidance_scale
        if req.uncond is None or g is None:
            raise ValueError("this batcher applies classifier-free guidance: give uncond and guidance_scale")
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not torch.isfinite(torch.tensor(g)):
            raise ValueError(f"guidance_scale={g!r} must be a finite float")
        return self.check_conditions(req, "uncond"), float(g)

    def predictor_input(self, cond: dict[str, Tensor]) -> Tensor | None:
        """What the predictor (and the NFE chooser) reads from one request's conditions, batch axis 1."""
        return pick(self.predictor_cond, unflatten({k: v[None].to(self.device) for k, v in cond.items()}))

    def choose_nfe(self, req: Request, drawn: Tensor | None = None) -> int:
        """The NFE the chooser picks from the request's x_T (and condition); ``drawn`` as in
        :meth:`initial_state`."""
        if self.chooser is None:
            raise ValueError("nfe='auto' needs a batcher built with an NFE chooser (chooser=NFEChooser(...))")
        x = self.initial_state(req, drawn)
        return self.chooser(x.to(self.device, torch.float32)[None],
                            self.predictor_input(self.check_conditions(req)))[0]

    def table(self, solver: str, opts: dict, grids: Tensor, shift: Tensor | None,
              scale: Tensor | None) -> tuple[Tensor, Tensor, int]:
        """Pool rows ``[g, max_stages, R]``, network times ``[g, max_stages]`` (on the CPU: the pool moves
        them) and the stage count S for ``g`` grids of one solver: the checked table (``sampling.table_for``)
        in the pool's layout (``sampling.pool_layout``)."""
        # the pool keeps coefficients (and computes) in coef_dtype, float32 for a float16/bfloat16 state
        table = table_for(self.den, grids, solver, self.coef_dtype, shift=shift, scale=scale, **opts)
        if table.scaled_input:
            raise ValueError("shift on a VP/flow model (a rescaled network input) is not served here")
        rows, time = pool_layout(self.den, table, self.dtype, self.max_stages, MAX_HISTORY)
        return rows.to(self.coef_dtype), time, table.nfe

    def group_table(self, solver: str, opts: dict, members: list[Admitted]) -> tuple[Tensor, Tensor, int]:
        """A group's tables: the cached heuristic one (one row) or theirs, built together (a group's members
        all have a shift, or none does; the same for the scale: both are part of the group key)."""
        first = members[0]
        if first.cached is not None:  # a cached heuristic table, shared by the whole group
            return self.tables[first.cached]
        stack = [None if getattr(first, k) is None else torch.stack([getattr(m, k) for m in members])
                 for k in ("grid", "shift", "scale")]
        return self.table(solver, opts, *stack)
