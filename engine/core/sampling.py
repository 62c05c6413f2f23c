"""Sampling over per-sample ("ragged") grids: input checks, the torch reference loop, public samplers.

``sample`` validates everything once, builds the solver's coefficient table (``solvers.build_table``) and
runs it through :func:`run`: :func:`run_fused` -- one fused ragged step per stage (``indis.kernels``: Triton
on CUDA, the optional C++ step on CPU) -- or :func:`run_table`, the readable torch reference of the generic
update that the fused steps mirror (used without a fused backend and whenever gradients must flow;
``INDIS_KERNELS`` overrides the choice, see ``indis.kernels.ragged_step.backend_for``). Neither loop makes a
host synchronisation: coefficients are device tensors prepared before the first model call, and Python only
branches on the table's static structure.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from indis.engine.core.families import Denoiser, Flow, as_denoiser, is_plain_value, raw_to_x0
from indis.engine.core.guidance import guided
from indis.engine.core.profiling import nvtx_range
from indis.engine.core.schedules import Schedule, as_grid
from indis.engine.core.solvers import DEFAULT_ORDER, SOLVER_OPTIONS, SOLVERS, SolverTable, build_table
from indis.kernels.ragged_step import PackedTable, backend_for, bind_step, fused, pack_table


def check_grid(grid: Tensor, family_range: tuple[float, float], allow_inf_start: bool) -> np.ndarray:
    """Raise ``ValueError`` naming ``sigmas`` for any ``[B, N+1]`` float grid the solvers cannot use (checked
    on a host copy: one transfer, then numpy reductions -- cheaper than device ops on grids this small).
    Returns that float64 host copy."""
    g = grid.detach().to("cpu", torch.float64).numpy()
    if np.isnan(g).any():
        raise ValueError("sigmas contains NaN")
    pos = g[:, :-1]
    if np.isinf(g[:, 1:]).any() or (np.isinf(g[:, 0]).any() and not allow_inf_start):
        raise ValueError("sigmas contains inf (only a flow model's first point, t = 1, may be inf)")
    if (pos <= 0).any() or (g[:, -1] < 0).any():
        raise ValueError("sigmas must be positive; only the last point may be 0")
    diffs = np.diff(g, axis=-1)
    if (diffs == 0).any():
        raise ValueError("sigmas has duplicated grid points (each sample's grid must be strictly descending)")
    if (diffs > 0).any():
        raise ValueError("sigmas must be strictly descending in every row (non-monotone grid)")
    zero_end = g[:, -1] == 0
    if zero_end.any() and not zero_end.all():
        raise ValueError("sigmas: either every row ends at 0 or none does")
    lo, hi = family_range
    finite = pos[np.isfinite(pos)]
    slack = 1e-6  # float32 grids taken from another library's float32 tables land within this
    if finite.size and (finite.min() < lo * (1 - slack) or finite.max() > hi * (1 + slack)):
        raise ValueError(f"sigmas has values in [{finite.min():.6g}, {finite.max():.6g}] outside the "
                         f"family's range [{lo:.6g}, {hi:.6g}]")
    return g


def per_step(name: str, value: Tensor | Sequence[float] | None, batch: int, steps: int,
             device: torch.device) -> Tensor | None:
    """``shift`` / ``scale`` as a finite float64 ``[B, N]`` tensor (from ``[N]`` or ``[B, N]``), or None."""
    if value is None:
        return None
    v = torch.as_tensor(value, dtype=torch.float64, device=device)
    if v.ndim == 1:
        v = v.unsqueeze(0)
    if v.ndim != 2 or v.shape[-1] != steps or v.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have shape [N] or [B, N] = [{batch}, {steps}], got {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or inf")
    return v.expand(batch, -1)


def check_state(x: object, name: str = "x", finite: bool = True) -> None:
    """Raise ``ValueError`` unless ``x`` is a (finite: the one check that reads the values) floating-point
    tensor ``[B, ...]`` with B > 0."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [B, ...]")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    if finite and x.numel():
        # min and max carry any NaN / inf: one pass (1-byte floats have no aminmax kernel)
        ends = torch.isfinite(x) if x.element_size() == 1 else torch.isfinite(torch.stack(torch.aminmax(x)))
        if not bool(ends.all()):
            raise ValueError(f"{name} contains NaN or inf")


def check_schedule(den: Denoiser, grid: Tensor, shift: Tensor | None, scale: Tensor | None,
                   dtype: torch.dtype, solver: str) -> None:
    """Raise ``ValueError`` for a ``[B, N+1]`` grid with ``[B, N]`` shift / scale that ``solver`` cannot
    run in ``dtype``: the grid must suit the family (:func:`check_grid`); scales must be positive, and their
    product over the steps times the state's noise scale at the largest sigma (``family.s``: sigma for VE,
    at most 1 for VP and flow) finite in ``dtype`` (a scale above 1 multiplies the state at every step);
    the network time of every point the solver evaluates -- step n's sigma_n times ``exp(shift_n)``, and
    for Heun also its sigma_{n+1} -- must be finite in ``dtype`` (for a network that takes sigma itself,
    also not rounded to 0). A flow model's t = 1 start is never shifted and is passed as it is (a network
    that takes sigma sees sigma = inf there, by design); sigma = 0 is never evaluated. Checked on host
    copies."""
    g = check_grid(grid, den.family.sigma_range, allow_inf_start=isinstance(den.family, Flow))
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        if scale is not None:
            sc = scale.detach().to("cpu", torch.float64).numpy()
            if (sc <= 0).any():
                raise ValueError("scale must be positive")
            largest = torch.from_numpy(np.where(np.isfinite(g[:, 0]), g[:, 0], g[:, 1]))
            size = np.maximum(den.family.s(largest).numpy(), 1.0)  # the state's noise scale there
            if not np.all(np.prod(np.maximum(sc, 1), axis=-1) * size <= torch.finfo(dtype).max):
                raise ValueError(f"scale is too large for {dtype}: a scale above 1 multiplies the state at "
                                 f"every step, and the product of a row's scales times the state's size at "
                                 f"its largest sigma overflows")
        points = np.stack([g[:, :-1], g[:, 1:]]) if solver == "heun" else g[:, :-1]  # each step's points
        if shift is not None:
            shift_np = shift.detach().to("cpu", torch.float64).numpy()
        evaluated = points if shift is None else points * np.exp(shift_np)
    used = (points > 0) & np.isfinite(points)
    if not used.any():
        return
    # The network time is monotone in sigma, so the extreme evaluation points decide.
    ends = np.array([evaluated[used].min(), evaluated[used].max()])
    if _usable(den, ends, dtype, grid.device).all():
        return
    bad = used & ~_usable(den, np.where(used, evaluated, 1.0), dtype, grid.device)  # masked: any fill works
    where = tuple(np.argwhere(bad)[0])
    sigma = float(evaluated[where])
    time = float(den.time(torch.tensor(sigma, dtype=torch.float64, device=grid.device)))
    raise ValueError(f"sample {where[-2]}, step {where[-1]}: the network would be evaluated at sigma = "
                     f"{sigma:.6g}, time {time:.6g}, which is not finite (or rounds to 0) in {dtype}; check "
                     f"sigmas and shift")


def _usable(den: Denoiser, sigma: np.ndarray, dtype: torch.dtype, device: torch.device) -> np.ndarray:
    """Per point: the network time at ``sigma`` is finite in ``dtype``; a network that takes sigma itself
    must not see a positive sigma rounded to 0 (t near 0 is an ordinary input of a t-input network)."""
    fi = torch.finfo(dtype)
    time = den.time(torch.as_tensor(sigma, dtype=torch.float64, device=device)).detach().cpu().numpy()
    size = np.abs(time)
    with np.errstate(invalid="ignore"):
        ok = size <= fi.max
        if den.time_input == "sigma":
            ok &= (size == 0) | (size > fi.smallest_normal * fi.eps / 2)
    return ok


def check_coefficients(table: SolverTable, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` if a coefficient of ``table`` overflows ``dtype``, to which the loop casts them
    (e.g. Heun's 1 / sigma_min = 1e5 in float16)."""
    if dtype == torch.float64:
        return
    largest = torch.stack([t.detach().abs().amax() for t in (table.conv, table.coef, table.in_scale)]).amax()
    if float(largest) > torch.finfo(dtype).max:
        raise ValueError(f"{table.solver}: a coefficient of this grid ({float(largest):.4g}) overflows "
                         f"{dtype}; use a larger sigma_min or a wider state dtype (float32)")


def check_solver(solver: object, solver_opts: dict | None) -> None:
    """Raise ``ValueError`` for an unknown solver or option name (values are checked by the table build)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is unknown; choose one of {SOLVERS}")
    if solver_opts is not None and not isinstance(solver_opts, dict):
        raise ValueError(f"solver_opts={solver_opts!r} must be a dict of option names to values")
    unknown = set(solver_opts or {}) - set(SOLVER_OPTIONS)
    if unknown:
        raise ValueError(f"unknown solver options {sorted(unknown, key=str)} for solver={solver!r}; "
                         f"known: {SOLVER_OPTIONS}")


def check_inputs(den: Denoiser, x: Tensor, sigmas: Tensor | Sequence[float] | Schedule, solver: str, *,
             shift: Tensor | Sequence[float] | None = None, scale: Tensor | Sequence[float] | None = None,
             solver_opts: dict | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The checks every entry point shares (``indis.sample``, ``GraphSampler``, the batcher), before any
    table is built: the state, the solver and its option names, the grid and shift / scale for this family
    and the state's dtype. Returns the grid ``[B, N+1]``, shift and scale ``[B, N]`` (float64 or None)."""
    if isinstance(sigmas, Schedule):
        if shift is not None or scale is not None:
            raise ValueError("sigmas is a Schedule with its own shift/scale; do not pass shift= or scale=")
        sigmas, shift, scale = sigmas.grid, sigmas.shift, sigmas.scale
    check_state(x)
    check_solver(solver, solver_opts)
    if sigmas is None:
        raise ValueError("sigmas is required: [N+1], [B, N+1] or a Schedule")
    if isinstance(sigmas, Tensor) and sigmas.device != x.device:
        raise ValueError(f"sigmas is on {sigmas.device} but x is on {x.device}")
    grid = as_grid(sigmas, batch_size=x.shape[0], device=x.device)
    steps = grid.shape[-1] - 1
    shift_t = per_step("shift", shift, x.shape[0], steps, x.device)
    scale_t = per_step("scale", scale, x.shape[0], steps, x.device)
    check_schedule(den, grid, shift_t, scale_t, x.dtype, solver)
    return grid, shift_t, scale_t


@dataclass(frozen=True)
class Stage:
    """What the loop reads at one stage, as tensors broadcastable against the state ``[B, 1, ...]``."""

    time: Tensor                              # [B] network time input
    in_scale: Tensor | None                   # network input = in_scale * state (None: 1)
    raw_scale: Tensor | None                  # h = raw_scale * raw + state_scale * state (None: 1 / 0)
    state_scale: Tensor | None
    y_terms: tuple[tuple[int, Tensor], ...]   # next state = sum coef * inputs[i]
    stash_terms: tuple[tuple[int, Tensor], ...]  # empty: the stash is left as it is


class _Layouts:
    """A table's layouts for one state shape and dtype, each made on first use; shared by every plan of a
    cached table."""

    __slots__ = ("time", "stages", "packed", "reports")

    def __init__(self) -> None:
        self.time: Tensor | None = None
        self.stages: tuple[Stage, ...] | None = None
        self.packed: PackedTable | None = None
        self.reports: tuple[Report, ...] | None = None


class Plan:
    """A validated solver table for one state shape and dtype, with the two layouts the loops read: per-stage
    views (:attr:`stages`, for :func:`run_table`) and packed rows (:attr:`packed`, for :func:`run_fused`).

    Built by :func:`prepare` (or taken from its cache); each layout is made on first use, so a plan builds
    only the one its backend reads. The loops then only call the network and combine tensors -- no slicing,
    casting or host synchronisation inside the loop.
    """

    def __init__(self, denoiser: Denoiser, table: SolverTable, x: Tensor, layouts: _Layouts | None = None
                 ) -> None:
        self.denoiser, self.table = denoiser, table
        self.shape, self.dtype = tuple(x.shape), x.dtype
        self._layouts = _Layouts() if layouts is None else layouts

    def _layout(self, name: str, make: Callable[[], object]) -> Any:
        """The shared layout ``name``, made on first use -- outside inference mode: a cached table's layouts
        serve later calls, under autograd too."""
        lay = self._layouts
        if getattr(lay, name) is None:
            with torch.inference_mode(False):
                setattr(lay, name, make())
        return getattr(lay, name)

    @property
    def time(self) -> Tensor:
        """The network's time input at each evaluated sigma ``[B, S]`` (float64)."""
        return self._layout("time", lambda: self.denoiser.time(self.table.sigma_eval))

    @property
    def stages(self) -> tuple[Stage, ...]:
        """Per-stage views of the table, cast to the state's dtype once."""
        return self._layout("stages", lambda: stage_views(self.table, self.time, self.shape, self.dtype))

    @property
    def reports(self) -> tuple[Report, ...]:
        """What a callback is told at each stage (made on the first call with a callback)."""
        return self._layout("reports", lambda: _reports(self.denoiser, self.table, self.shape, self.dtype))

    @property
    def packed(self) -> PackedTable:
        """The table laid out for the fused step (``indis.kernels.ragged_step.pack_table``)."""
        return self._layout("packed", lambda: pack_table(self.table, self.time, self.dtype))


def stage_views(table: SolverTable, time: Tensor, shape: tuple[int, ...], dtype: torch.dtype
                ) -> tuple[Stage, ...]:
    """The table's per-stage :class:`Stage` views for states shaped ``shape`` (a table of one row serves any
    batch: its views broadcast), cast to ``dtype`` once; ``time``: the network time per evaluation."""
    view = (shape[0],) + (1,) * (len(shape) - 1)

    def cols(t: Tensor) -> tuple[Tensor, ...]:  # [B, S] -> S views [B, 1, ...]
        return t.to(dtype).t().reshape(-1, *view).unbind(0)

    coef = table.coef.to(dtype).permute(1, 2, 3, 0).reshape(*table.coef.shape[1:], *view)  # [S, 2, W, B..]
    in_scale, raw_scale = cols(table.in_scale), cols(table.conv[..., 1])
    state_scale = cols(table.conv[..., 0])
    times = time.to(dtype).unbind(1)
    return tuple(Stage(times[k], in_scale[k] if table.scaled_input else None,
                       raw_scale[k] if table.conv_scales_raw[k] else None,
                       state_scale[k] if table.conv_uses_state[k] else None,
                       tuple((i, coef[k, 0, i]) for i in y_idx),
                       tuple((i, coef[k, 1, i]) for i in s_idx))
                 for k, (y_idx, s_idx) in enumerate(table.support))


@dataclass(frozen=True)
class Report:
    """One stage as k-diffusion's callback contract names it: step ``i``, the grid's ``sigma`` at the point
    the network evaluates (``[B]``, per sample: sigma_i, or sigma_{i+1} for Heun's second evaluation) and
    the evaluated ``sigma_hat`` (with an INDIS shift ``sigma * exp(shift)``), and the coefficients of
    ``denoised = a * network input + b * raw`` (broadcastable against the state)."""

    i: int
    sigma: Tensor
    sigma_hat: Tensor
    a: Tensor
    b: Tensor


def _reports(den: Denoiser, table: SolverTable, shape: tuple[int, ...], dtype: torch.dtype
             ) -> tuple[Report, ...]:
    view = (shape[0],) + (1,) * (len(shape) - 1)
    a, b = raw_to_x0(den.prediction, den.family, table.sigma_eval)
    return tuple(Report(i, table.grid[:, p].to(dtype), table.sigma_eval[:, k].to(dtype),
                        a[:, k].to(dtype).reshape(view), b[:, k].to(dtype).reshape(view))
                 for k, (i, p) in enumerate(zip(table.step_of_stage, table.point_of_stage, strict=True)))


def _tell(callback: Callable[[dict], None], report: Report, k: int, x: Tensor, inp: Tensor, raw: Tensor
          ) -> None:
    """k-diffusion's callback contract (``x``, ``i``, ``sigma``, ``sigma_hat``, ``denoised``), plus ``stage``
    and the network's ``raw`` output."""
    callback({"x": x, "i": report.i, "sigma": report.sigma, "sigma_hat": report.sigma_hat,
              "denoised": report.a * inp + report.b * raw, "stage": k, "step": report.i, "raw": raw})


def _stage_range(stages: int, progress: bool | None) -> Sequence[int]:
    """The stage indices, behind a progress bar unless ``progress`` is False (None: tqdm's choice, shown
    on a terminal only -- k-diffusion's ``disable=None``)."""
    if progress is False:
        return range(stages)
    return tqdm(range(stages), disable=None if progress is None else not progress, leave=False, desc="indis")


def make_plan(den: Denoiser, table: SolverTable, x: Tensor) -> Plan:
    """A :class:`Plan` of ``table`` for states shaped like ``x`` (layouts made on first use)."""
    return Plan(den, table, x)


def table_for(den: Denoiser, grid: Tensor, solver: str, dtype: torch.dtype, *, shift: Tensor | None = None,
              scale: Tensor | None = None, check: bool = True, **build_opts) -> SolverTable:
    """The one way into the coefficient tables for ``indis.sample``, ``GraphSampler`` and the batcher: the
    solver's table (``solvers.build_table``) for the denoiser's family and prediction type, and -- unless
    ``check=False`` (inside a CUDA graph, where a check would need a host sync) -- no coefficient overflowing
    the state's ``dtype`` (:func:`check_coefficients`). Inputs come from :func:`check_inputs`."""
    table = build_table(solver, grid, den.family, prediction=den.prediction, shift=shift, scale=scale,
                        **({} if check else {"check_finite": False}), **build_opts)
    if check:
        check_coefficients(table, dtype)
    return table


def pool_layout(den: Denoiser, table: SolverTable, dtype: torch.dtype, stages: int, history: int
                ) -> tuple[Tensor, Tensor]:
    """``table`` packed as for :func:`run_fused` (``pack_table``), then zero-padded for a slot pool that
    holds ``stages`` stages and ``history`` history slots per sample: rows ``[B, stages, 2 + 2(3 + history)]``
    and network times ``[B, stages]`` (rows past a sample's own stages are zero)."""
    if table.history > history or table.nfe > stages:
        raise ValueError(f"{table.solver} with these options needs {table.nfe} stages and {table.history} "
                         f"history slots; this pool holds {stages} and {history}")
    packed = pack_table(table, den.time(table.sigma_eval), dtype)
    b, s, w, wide = packed.rows.shape[0], packed.stages, packed.width, 3 + history
    rows = packed.rows.new_zeros(b, stages, 2 + 2 * wide)
    rows[:, :s, :2] = packed.rows[..., :2]
    rows[:, :s, 2:].view(b, s, 2, wide)[..., :w] = packed.rows[..., 2:].view(b, s, 2, w)
    time = packed.time.new_zeros(b, stages)
    time[:, :s] = packed.time
    return rows, time


#: How many validated tables :func:`prepare` keeps (least recently used first out).
PLAN_CACHE_SIZE = 64
_plans: OrderedDict[tuple, tuple[SolverTable, _Layouts]] = OrderedDict()
_plans_lock = threading.Lock()


def clear_plan_cache() -> None:
    """Forget every table :func:`prepare` keeps."""
    with _plans_lock:
        _plans.clear()


def _plan_key(den: Denoiser, x: Tensor, sigmas: object, solver: str, shift: object, scale: object,
              solver_opts: dict) -> tuple | None:
    """The value that decides a table and its layouts: the solver and its options, the grid / shift / scale
    bytes, the state's shape, dtype and device, and the denoiser's family, prediction and time input. None
    (no caching) when a gradient may flow or an input is not a plain tensor or sequence."""
    if torch.is_inference_mode_enabled() or not isinstance(solver, str):
        return None  # inference tensors cannot serve a later call under autograd
    if isinstance(sigmas, Schedule):
        if shift is not None or scale is not None:
            return None  # check_inputs refuses it
        sigmas, shift, scale = sigmas.grid, sigmas.shift, sigmas.scale
    parts = []
    for v in (sigmas, shift, scale):
        if v is None:
            parts.append(None)
            continue
        try:  # the input's own type is part of the key: a list and a tensor are read differently
            t = v if isinstance(v, Tensor) else torch.as_tensor(v, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            return None
        if t.requires_grad or not t.is_floating_point() or t.device != x.device:
            return None  # (a grid on another device is refused by check_inputs)
        parts.append((type(v), tuple(t.shape), t.dtype, t.device,
                      t.detach().cpu().contiguous().numpy().tobytes()))
    opts = []
    for name, v in sorted(solver_opts.items()):
        v = tuple(v) if isinstance(v, list) else v
        if not is_plain_value(v) or not isinstance(name, str):
            return None
        opts.append((name, type(v), v))
    family = den.family.key()
    if family is None:
        return None
    return (solver, tuple(opts), *parts, tuple(x.shape), x.dtype, x.device, type(den), family,
            den.prediction, den.time_input, den.time_scale)


def prepare(model: Callable[..., Tensor] | Denoiser, x: Tensor, sigmas: Tensor | Sequence[float] | Schedule,
            solver: str = "ipndm", *, shift: Tensor | None = None, scale: Tensor | None = None,
            **solver_opts) -> Plan:
    """Everything before the loop: validate the inputs (:func:`check_inputs`) and build the checked solver
    table (:func:`table_for`) as a :class:`Plan`.

    ``sigmas`` may be a :class:`~indis.engine.core.schedules.Schedule` (an INDIS predictor's output), which
    carries its own ``shift`` and ``scale``. Tables are cached by value (the last :data:`PLAN_CACHE_SIZE`):
    a call with the same grid, shift, scale, solver, options, state shape, dtype and device and a denoiser of
    the same family, prediction and time input reuses the validated table and its layouts, and only checks
    ``x`` (its shape, dtype and finiteness) -- the values that decided the table were checked when it was
    built. Calls through which a gradient may flow are not cached. :func:`clear_plan_cache` empties it.
    """
    den = as_denoiser(model)
    key = None
    if isinstance(x, Tensor) and not (torch.is_grad_enabled() and x.requires_grad):
        key = _plan_key(den, x, sigmas, solver, shift, scale, solver_opts)
    if key is not None:
        with _plans_lock:
            hit = _plans.get(key)
            if hit is not None:
                _plans.move_to_end(key)
        if hit is not None:
            check_state(x)
            return Plan(den, hit[0], x, hit[1])
    grid, shift, scale = check_inputs(den, x, sigmas, solver, shift=shift, scale=scale,
                                      solver_opts=solver_opts)
    if key is not None:
        grid = grid.clone()  # the table keeps its grid: not a view of a buffer the caller may reuse
    with nvtx_range("coefficients"):
        plan = Plan(den, table_for(den, grid, solver, x.dtype, shift=shift, scale=scale, **solver_opts), x)
    if key is not None and not plan.table.coef.requires_grad:
        with _plans_lock:
            _plans[key] = (plan.table, plan._layouts)
            while len(_plans) > PLAN_CACHE_SIZE:
                _plans.popitem(last=False)
    return plan


def _lin(terms: tuple[tuple[int, Tensor], ...], inputs: Sequence[Tensor]) -> Tensor:
    (i0, c0), *rest = terms
    out = inputs[i0] * c0
    for i, c in rest:
        out = out.addcmul_(inputs[i], c)
    return out


def check_finite(t: Tensor, what: str, stage: int | None = None, step: int | None = None) -> None:
    """Raise ``FloatingPointError`` naming the samples (rows of ``t``) that hold NaN or inf, and the stage."""
    bad = ~torch.isfinite(t.flatten(1)).all(1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        where = "" if stage is None else f" at stage {stage} (step {step})"
        raise FloatingPointError(f"{what} is NaN or inf{where} for sample(s) {rows[:16]}"
                                 f"{' ...' if len(rows) > 16 else ''} of {t.shape[0]}")


def stage_update(st: Stage, y: Tensor, stash: Tensor, hist: list[Tensor], raw: Tensor, history: int
                 ) -> tuple[Tensor, Tensor, list[Tensor]]:
    """One stage's linear update (the generic ragged step in torch): the network's ``raw`` output at state
    ``y`` becomes ``h = raw_scale * raw + state_scale * y``, and the next state and stash are the stage's
    combinations of ``(y, stash, h, *hist)``; returns ``(y, stash, hist)`` with ``h`` pushed onto a history
    of ``history`` outputs."""
    h = raw if st.raw_scale is None else raw * st.raw_scale
    if st.state_scale is not None:
        h = h.addcmul(y, st.state_scale)
    inputs = (y, stash, h, *hist)
    y_next = _lin(st.y_terms, inputs)
    if st.stash_terms:
        stash = _lin(st.stash_terms, inputs)
    return y_next, stash, [h, *hist][:history]


StepEnd = Callable[[int, Tensor], "Tensor | None"]


def _ends_step(plan: Plan, k: int) -> bool:
    """Whether stage ``k`` is the last of its grid step (Heun's second evaluation; a one-stage step's
    only one)."""
    steps = plan.table.step_of_stage
    return k + 1 == len(steps) or steps[k + 1] != steps[k]


def run_table(plan: Plan, x: Tensor, cond: dict | None = None, callback: Callable[[dict], None] | None = None,
              check_output: bool = False, progress: bool | None = False, step_end: StepEnd | None = None
              ) -> Tensor:
    """Torch reference of the generic ragged step: one model call and one linear update per stage.
    ``check_output``: after each stage, raise if the model output or the state is not finite (a host sync
    per stage). ``callback``, ``progress`` and ``step_end``: see :func:`run`."""
    cond = cond or {}
    den, history = plan.denoiser, plan.table.history
    reports = plan.reports if callback is not None else ()
    y, stash, hist = x, x, []
    for k in _stage_range(len(plan.stages), progress):
        st = plan.stages[k]
        inp = y if st.in_scale is None else y * st.in_scale
        with nvtx_range(f"denoiser {k}"):
            raw = den.raw(inp, st.time, **cond)
        if check_output:
            check_finite(raw, "the model output", k, plan.table.step_of_stage[k])
        if callback is not None:  # a copy, as on the fused path: a callback cannot edit the sample
            before = y.clone()
            _tell(callback, reports[k], k, before, before if inp is y else inp, raw)
        with nvtx_range(f"step {k}"):
            y_next, stash, hist = stage_update(st, y, stash, hist, raw, history)
        if check_output:
            check_finite(y_next, "the state", k, plan.table.step_of_stage[k])
        y = y_next
        if step_end is not None and _ends_step(plan, k):
            edited = step_end(plan.table.step_of_stage[k], y.clone())
            if edited is not None:
                y = _edited_state(edited, y)
    return y


def _edited_state(edited: object, y: Tensor) -> Tensor:
    """A ``step_end`` hook's replacement state, checked to be shaped like the state."""
    if not isinstance(edited, Tensor) or edited.shape != y.shape:
        got = tuple(edited.shape) if isinstance(edited, Tensor) else type(edited).__name__
        raise ValueError(f"step_end returned {got}; return None or a state of shape {tuple(y.shape)}")
    return edited.to(y.dtype)


def run_fused(plan: Plan, x: Tensor, cond: dict | None = None, callback: Callable[[dict], None] | None = None,
              backend: str | None = None, check_output: bool = False,
              progress: bool | None = False, step_end: StepEnd | None = None) -> Tensor:
    """The sampling loop with one fused ragged step per stage (Triton, C++ or the torch reference).

    State, stash and history live in preallocated buffers updated in place; the stage index is a device
    tensor the kernel reads (a broadcast view of ``arange(S)``), so the loop issues no host sync and no
    allocation besides the denoiser's own (``check_output`` adds one sync per stage, as in :func:`run_table`;
    a ``callback`` is told a copy of the state).
    """
    cond = cond or {}
    den, packed = plan.denoiser, plan.packed
    reports = plan.reports if callback is not None else ()
    bsz = x.shape[0]
    y = x.clone(memory_format=torch.contiguous_format)
    stash = torch.empty_like(y) if packed.uses_stash else None
    hist = y.new_empty((packed.history, *y.shape)) if packed.history else None
    stage = torch.arange(packed.stages, device=x.device, dtype=torch.int32)
    step = bind_step(y, stash, hist, packed, stage, backend)
    view = (bsz,) + (1,) * (x.ndim - 1)
    for k in _stage_range(packed.stages, progress):
        inp = y if packed.in_scale is None else y * packed.in_scale[:, k].view(view)
        with nvtx_range(f"denoiser {k}"):
            raw = den.raw(inp, packed.time[:, k], **cond).contiguous()
        if check_output:
            check_finite(raw, "the model output", k, plan.table.step_of_stage[k])
        if callback is not None:  # the step updates y in place: the callback gets a copy
            before = y.clone()
            _tell(callback, reports[k], k, before, before if inp is y else inp, raw)
        with nvtx_range(f"step {k}"):
            step(raw, k)
        if check_output:
            check_finite(y, "the state", k, plan.table.step_of_stage[k])
        if step_end is not None and _ends_step(plan, k):
            edited = step_end(plan.table.step_of_stage[k], y.clone())
            if edited is not None:
                y.copy_(_edited_state(edited, y))
    return y


def _needs_autograd(plan: Plan, x: Tensor) -> bool:
    """Whether gradients must flow through the loop (to x, the schedule or the model's parameters): the
    fused step updates buffers in place outside autograd, so then the reference loop runs."""
    if not torch.is_grad_enabled():
        return False
    net = plan.denoiser.net
    params = net.parameters() if isinstance(net, torch.nn.Module) else ()
    return (x.requires_grad or plan.table.coef.requires_grad or plan.table.conv.requires_grad
            or any(p.requires_grad for p in params))


def run(plan: Plan, x: Tensor, cond: dict | None = None, callback: Callable[[dict], None] | None = None,
        backend: str | None = None, check_output: bool = False, progress: bool | None = False,
        step_end: StepEnd | None = None) -> Tensor:
    """Run a prepared plan: the fused loop when the backend has a fused step (triton on CUDA, the C++
    extension on CPU) and no gradient has to flow through the loop, else the torch reference loop.

    ``callback`` and ``progress``: see :func:`sample`. ``step_end(i, y)``: called after each grid step ``i``
    (once per step, after its last evaluation) with a copy of the state; a tensor it returns replaces the
    state (diffusers' ``callback_on_step_end`` editing ``latents``) -- the same on every backend: the
    solver's history and stash are left as they are, only the state changes."""
    backend = backend_for(x.device, backend)
    if fused(backend, x.dtype) and not _needs_autograd(plan, x):
        return run_fused(plan, x, cond, callback, backend, check_output, progress, step_end)
    return run_table(plan, x, cond, callback, check_output, progress, step_end)


def sample(model: Callable[..., Tensor] | Denoiser, x: Tensor, sigmas: Tensor | Sequence[float] | Schedule,
           solver: str = "ipndm", *, shift: Tensor | None = None, scale: Tensor | None = None,
           cond: dict | None = None, callback: Callable[[dict], None] | None = None,
           backend: str | None = None, check_output: bool = False, progress: bool | None = False,
           uncond: dict | None = None, guidance_scale: float | Tensor | None = None,
           guidance_rescale: float = 0.0, guidance_batched: bool = True, **solver_opts) -> Tensor:
    """Sample with per-sample grids.

    ``model(x, sigma[B], **cond) -> x0`` (k-diffusion convention), or a :class:`Denoiser` wrapping a VP /
    flow network, in which case ``x`` and the result are in that family's coordinate (a flow model's
    ``x_t``, so a start at t = 1 -- sigma = inf -- is allowed). ``sigmas`` is ``[N+1]`` or ``[B, N+1]``,
    descending, optionally ending at 0, or a ``Schedule`` from an INDIS predictor. ``shift`` / ``scale``
    are INDIS's per-step time shift and noise-prediction scale, ``[N]`` or ``[B, N]``: the network is
    called at ``sigma_n * exp(shift_n)`` and its eps there, times ``scale_n``, drives the step on the
    unshifted grid (``solvers`` module docstring). ``solver_opts``: ``order``, ``frame``,
    ``variant`` (UniPC bh1/bh2), ``corrector``, ``disable_corrector``, ``lower_order_final`` -- see
    ``solvers.build_table``. ``backend``: ``"triton"`` (fused kernel, the default on CUDA), ``"native"``
    (the C++ fused step, the default on CPU where it is built) or ``"torch"`` (the reference loop);
    ``INDIS_KERNELS`` sets the default; an unknown or unavailable backend is an error. When gradients must
    flow (tuning), the reference loop runs. ``check_output``: raise ``FloatingPointError`` naming the samples
    and the stage where the model output or the state first holds NaN or inf (one host sync per stage; off
    by default). Inputs are checked by :func:`check_inputs`.

    ``callback`` follows k-diffusion's contract on every backend: after each network evaluation (stage) it
    gets ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` -- the state the network saw (in the model
    family's coordinate; k-diffusion's x for a VE model), the grid step ``i``, the grid's sigma there and
    the evaluated one (``[B]`` tensors: every sample has its own), and the network's x0 estimate at that
    point (before INDIS's scale) -- plus ``stage`` and the network's ``raw`` output. The dict holds copies:
    editing them does not change the sample. A solver with two evaluations per step (Heun) calls it twice
    with the same ``i``, the second time at sigma_{i+1} (k-diffusion's Heun calls it once).
    ``progress``: a tqdm bar over the stages (None: on a terminal only; off by default).

    Classifier-free guidance: ``uncond`` (the unconditional inputs, same keys and shapes as ``cond``, e.g. a
    negative prompt's embeddings) with ``guidance_scale`` (a float or a ``[B]`` tensor: per-sample guidance)
    combines the network's outputs as ``u + g (c - u)`` in one batched call (``guidance_batched=False``: two
    calls), with optional ``guidance_rescale`` (Lin et al. 2024); see ``guidance.guided``.
    """
    if uncond is not None or guidance_scale is not None:
        if uncond is None or guidance_scale is None or not cond:
            raise ValueError("classifier-free guidance needs cond, uncond and guidance_scale together")
        model = guided(as_denoiser(model), uncond, guidance_scale, guidance_rescale=guidance_rescale,
                       batched=guidance_batched)
    plan = prepare(model, x, sigmas, solver, shift=shift, scale=scale, **solver_opts)
    return run(plan, x, cond, callback, backend, check_output, progress)


# ------------------------------------------------------------------------- k-diffusion-shaped samplers
def _kd(solver: str, **fixed) -> Callable[..., Tensor]:
    def sampler(model: Callable[..., Tensor], x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                callback: Callable[[dict], None] | None = None, disable: bool | None = None,
                **opts) -> Tensor:
        return sample(model, x, sigmas, solver, cond=extra_args, callback=callback,
                      progress=None if disable is None else not disable, **fixed, **opts)

    sampler.__name__ = f"sample_{solver}"
    sampler.__doc__ = (f"k-diffusion-shaped ``{solver}`` sampler: ``(model, x, sigmas, extra_args=None, "
                       f"callback=None, disable=None, **opts)``; sigmas ``[N+1]`` or ``[B, N+1]``; "
                       f"``disable`` hides the progress bar (None: shown on a terminal only), ``callback`` "
                       f"as in ``indis.sample``. "
                       f"See ``indis.sample`` and ``solvers`` for the algorithm.")
    return sampler


sample_euler = _kd("euler")
sample_heun = _kd("heun")
sample_dpmpp_2m = _kd("dpmpp_2m")
sample_dpmpp_3m = _kd("dpmpp_3m")
sample_ipndm = _kd("ipndm")
sample_ipndm_v = _kd("ipndm_v")
sample_unipc = _kd("unipc")

__all__ = ["DEFAULT_ORDER", "PLAN_CACHE_SIZE", "Plan", "Stage", "check_coefficients", "check_finite",
           "check_grid", "clear_plan_cache",
           "check_inputs", "check_schedule", "check_solver", "check_state",
           "make_plan", "per_step", "pool_layout", "prepare", "run", "run_fused", "run_table", "sample",
           "stage_update", "stage_views", "table_for",
           "sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_dpmpp_3m", "sample_ipndm",
           "sample_ipndm_v", "sample_unipc"]
