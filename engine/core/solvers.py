"""Multistep solvers as per-sample coefficient tables.

A solver over a ``[B, N+1]`` grid is a sequence of S *stages* (one model call each). At stage k the sampler
holds the state ``y`` (in the model family's own coordinate), an optional ``stash`` (a saved state: Heun's
step start, UniPC's corrected state) and the converted outputs of earlier stages ``H_1, H_2, ...`` (newest
first). It calls the network once and does one generic linear update::

    raw   = net(in_scale[k] * y, time(sigma_eval[k]))
    h     = conv[k, 0] * y + conv[k, 1] * raw                            # raw -> the solver's variable
    y'    = sum_i coef[k, 0, i] * (y, stash, h, H_1, ..., H_K)[i]
    stash'= sum_i coef[k, 1, i] * (y, stash, h, H_1, ..., H_K)[i]        # only if uses_stash
    push h onto the history

Every coefficient is a per-sample tensor computed here once, in float64, over all steps at once (per-step
arrays ``[B, N]``; steps whose order or structure differs are handled as a few runs joined by slices, never
an index tensor, so the build stays free of host-to-device copies), from the sample's own grid, the
INDIS per-step shift and scale, the model's prediction type (eps / x0 / v / flow velocity, folded into
``conv``) and the change of variables between the family's state and the frame a solver is defined in.

**INDIS's corrected network call** (Yuan et al. 2026):
``eps_hat_n = gamma_n * eps_theta(x_n, tau_n + dtau_n)``. The time shift ``dtau_n`` (``shift``, log-sigma
units) moves only the network's evaluation point, ``sigma_eval = sigma_n * exp(dtau_n)``; the network sees the
same point x_n (in VE terms; in the family's coordinate its input is ``in_scale = alpha(sigma_eval) /
alpha(sigma_n)`` times the state). The noise prediction of that call -- ``eps = (x - D(x, sigma_eval)) /
sigma_eval`` for a VE x0 denoiser D, the same quantity as an eps model's output or a flow model's
``x_t + (1 - t) v`` -- is multiplied by the output scale ``gamma_n`` (``scale``), and the solver steps on the
*unshifted* grid with it: a data-prediction solver sees ``x0_hat = x_n - sigma_n * eps_hat = (1 - k) x_n +
k D`` with ``k = gamma_n * exp(-dtau_n)``, a derivative solver ``(x_n - x0_hat) / sigma_n = eps_hat``. (Taking
D itself as x0_hat would step with ``exp(dtau_n)`` times that eps.) Both fold into ``conv``: no extra work per
step. A step from sigma = inf (a flow model's t = 1, where eps is the state itself) is neither shifted nor
scaled.

The torch reference (``sampling.run_table``) and the fused kernel consume the same table. ``support`` records
which inputs each row uses (structure only, never values) so the reference path skips structural zeros
without looking at tensor values.

Solvers (the paper each follows, and which variable it integrates):

* ``euler`` -- Euler on the VE probability-flow ODE, written in its exact exponential form, which is DDIM
  (Song et al. 2021) and DPM-Solver++(1); identical for every family and frame.
* ``heun`` -- EDM's 2nd-order Heun (Karras et al. 2022, Alg. 1, deterministic), 2 evaluations per step and
  Euler for a final step to sigma = 0.
* ``ipndm`` -- iPNDM with *fixed* Adams-Bashforth coefficients (Zhang & Chen 2023, DEIS; the EDM-style
  variant used by AMED, LD3 and INDIS): orders 1..4 with lower-order warm-up, the step-size ratios ignored.
* ``ipndm_v`` -- variable-step iPNDM: the *exact* variable-step Adams-Bashforth coefficients (integral of the
  Lagrange interpolant of past derivatives over the sample's own step); equals ``ipndm`` on a uniform grid
  in the frame's time. (Other libraries' "ipndm_v" use approximate order-3/4 coefficients.)
* ``dpmpp_2m`` / ``dpmpp_3m`` -- DPM-Solver++ multistep (Lu et al. 2022), data prediction, 2M in the midpoint
  form shared by diffusers and k-diffusion, with diffusers' lower-order final steps. 3M is the published
  formula (DPM-Solver repo, diffusers), kept for parity although it weights its second difference
  D2 ~ h^2/2 D'' by half the Taylor-exact coefficient, which makes it formally 2nd order (measured in
  ``tests/engine/core/test_solvers.py::test_local_order_of_the_coefficient_table``).
* ``unipc`` -- UniPC (Zhao et al. 2023) with B(h) = ``bh1`` or ``bh2``, orders 1..3, data prediction,
  corrector UniC on by default (``corrector=False`` or ``disable_corrector=[steps]`` turn it off).

Derivative solvers (euler's frame-free form aside: heun, ipndm, ipndm_v) integrate ``dz/dtau = (z - x0)/tau``
in a *frame*: ``"ve"`` (z = VE x, tau = sigma: EDM/k-diffusion, the default for VE and VP models) or
``"flow"`` (z = x / (1 + sigma), tau = sigma / (1 + sigma): flow matching's x_t and t, the default for flow
models, finite at t = 1). Exponential integrators (euler, dpmpp, unipc) are frame-invariant; for them a grid
point at sigma = inf (a flow model's t = 1, lambda = -inf) is never used as multistep history: the order is
reduced there instead (the exact limit for 2M) and UniPC does not correct the step that leaves it.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from indis.engine.core.families import VE, Flow, NoiseFamily, Prediction, raw_to_x0

Frame = Literal["ve", "flow"]
SOLVERS = ("euler", "heun", "ipndm", "ipndm_v", "dpmpp_2m", "dpmpp_3m", "unipc")
#: Solvers whose update uses the frame derivative (the others are exponential integrators).
DERIVATIVE_SOLVERS = ("heun", "ipndm", "ipndm_v")
MAX_ORDER = {"euler": 1, "heun": 2, "ipndm": 4, "ipndm_v": 4, "dpmpp_2m": 2, "dpmpp_3m": 3, "unipc": 3}
DEFAULT_ORDER = {"ipndm": 4, "ipndm_v": 4, "unipc": 2}
#: The options a caller may pass to :func:`build_table` (the rest are for callers that vouch for the grid).
SOLVER_OPTIONS = ("frame", "order", "variant", "corrector", "disable_corrector", "lower_order_final")

# Input slots of the generic update.
Y, STASH, H = 0, 1, 2


def HIST(j: int) -> int:
    """Slot of the output pushed ``j`` stages ago (j >= 1)."""
    return H + j


Row = dict[int, Tensor]

# Fixed Adams-Bashforth coefficients, newest derivative first (iPNDM).
_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@dataclass(frozen=True)
class SolverTable:
    """Per-sample coefficient table of one solver over a ``[B, N+1]`` grid (see module docstring)."""

    solver: str
    grid: Tensor        # [B, N+1] sigma, descending
    sigma_eval: Tensor  # [B, S] noise level passed to the network
    in_scale: Tensor    # [B, S] network input = in_scale * state
    conv: Tensor        # [B, S, 2] h = conv[..., 0] * state + conv[..., 1] * raw
    coef: Tensor        # [B, S, 2, 3 + K] rows (next state, next stash) over (state, stash, h, H_1..H_K)
    support: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # nonzero inputs per stage and row
    conv_uses_state: tuple[bool, ...]  # per stage: is conv[..., 0] structurally nonzero
    conv_scales_raw: tuple[bool, ...]  # per stage: is conv[..., 1] structurally different from 1
    scaled_input: bool                 # is in_scale structurally different from 1 (a shift on VP/flow)
    step_of_stage: tuple[int, ...]     # grid step each stage belongs to
    point_of_stage: tuple[int, ...]    # grid point each stage evaluates the network at (before the shift)
    history: int                       # K
    uses_stash: bool

    @property
    def nfe(self) -> int:
        return len(self.step_of_stage)

    @property
    def steps(self) -> int:
        return self.grid.shape[-1] - 1


@dataclass
class _Built:
    """A solver's stages as stage-major tensors (what :func:`_assemble` turns into a table): ``p`` / ``q``
    ``[B, S]`` of ``h = p * y + q * x0`` (``p_used[k]``: p structurally nonzero at stage k), the update rows
    ``coef [B, S, 2, W]`` and the structure -- each stage's grid step and evaluated point, the nonzero slots
    of its two rows and whether it writes the stash."""

    steps: tuple[int, ...]
    points: tuple[int, ...]
    p: Tensor
    p_used: tuple[bool, ...]
    q: Tensor
    coef: Tensor
    support: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    writes_stash: tuple[bool, ...]


def _runs(orders: list[int]) -> list[tuple[int, slice]]:
    """Maximal runs of equal order: ``[(order, slice of steps)]`` (few, so per-run ops stay few)."""
    out, start = [], 0
    for n in range(1, len(orders) + 1):
        if n == len(orders) or orders[n] != orders[start]:
            out.append((orders[start], slice(start, n)))
            start = n
    return out


def _by_run(orders: list[int], column) -> Tensor:
    """``[B, N]``: each run's ``column(order, steps)`` side by side (slices and one cat: no index tensor, so
    no host-to-device copy inside a CUDA graph capture)."""
    parts = [column(k, sl) for k, sl in _runs(orders)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _one_stage_per_step(orders: list[int], p: Tensor | None, q: Tensor, cols: list[Tensor | None]
                        ) -> _Built:
    """A solver with one evaluation per step at the step's own point and no stash: the state row's columns
    ``cols`` (None: structurally zero) over slots (y, stash, h, H_1, ...); slot ``H + j`` is used where the
    step's order exceeds j."""
    zero = q.new_zeros(q.shape)
    y_row = torch.stack([zero if c is None else c for c in cols], dim=-1)
    coef = torch.stack([y_row, torch.zeros_like(y_row)], dim=2)
    steps = tuple(range(len(orders)))
    support = tuple((tuple([Y, H, *(HIST(j) for j in range(1, k))]), ()) for k in orders)
    return _Built(steps, steps, zero if p is None else p, (p is not None,) * len(orders), q, coef, support,
                  (False,) * len(orders))


class _Points:
    """Per-grid-point quantities ``[B, N+1]`` in float64: family scales, lambda, frame time and ratio."""

    def __init__(self, grid: Tensor, family: NoiseFamily, frame: Frame) -> None:
        self.sigma = grid
        self.alpha, self.s = family.alpha(grid), family.s(grid)
        self.lam = -torch.log(grid)
        if frame == "ve":
            self.tau, self.rho = grid, self.alpha         # state y = rho * z, z = VE x
        else:
            self.tau, self.rho = Flow().t(grid), self.alpha + self.s  # z = x/(1+sigma) = flow x_t

    def steps_h(self) -> Tensor:
        """Every step's ``h`` ``[B, N]``."""
        return self.lam[:, 1:] - self.lam[:, :-1]


def _combine(*terms: tuple[Tensor | float, Row]) -> Row:
    """Linear combination of rows: sum of coefficient * row."""
    out: Row = {}
    for c, row in terms:
        for i, v in row.items():
            out[i] = out[i] + c * v if i in out else c * v
    return out


# --------------------------------------------------------------------------------------------- solvers
def _built_heun(pt: _Points, steps: int, *, final_zero: bool, **_: object) -> _Built:
    """EDM's Heun over every step at once, its two stages interleaved: an Euler predictor from y_n (saving
    y_n in the stash), then the trapezoid from the stash with the derivatives at sigma_n and sigma_{n+1};
    Euler alone for a final step to sigma = 0."""
    rho0, rho1, tau0, tau1 = pt.rho[:, :-1], pt.rho[:, 1:], pt.tau[:, :-1], pt.tau[:, 1:]
    ratio, cf = rho1 / rho0, rho1 * (tau1 - tau0)          # z' = z + dtau * g, in state coordinates
    two = steps - 1 if final_zero else steps                # steps with a second (corrector) stage
    zero, one = torch.zeros_like(ratio), torch.ones_like(ratio)
    stash = torch.stack([one, zero, zero, zero], -1)
    if two < steps:  # the final Euler step keeps no stash
        stash[:, two:] = 0
    first = torch.stack([torch.stack([ratio, zero, cf, zero], -1), stash], 2)
    half = cf * 0.5
    second = torch.stack([torch.stack([zero, ratio, half, half], -1), torch.zeros_like(first[:, :, 0])], 2)
    if two == 0:  # one Euler step to sigma = 0: no history slot
        first = first[..., :3]
    p_a, q_a = 1.0 / (rho0 * tau0), -1.0 / tau0            # the frame derivative at sigma_n ...
    p_b, q_b = 1.0 / (rho1[:, :two] * tau1[:, :two]), -1.0 / tau1[:, :two]   # ... and at sigma_{n+1}

    def interleave(a: Tensor, b: Tensor) -> Tensor:  # [B, N, ...] and [B, two, ...] -> A0, B0, A1, B1, ...
        if two == 0:
            return a
        pairs = torch.stack([a[:, :two], b[:, :two]], dim=2).flatten(1, 2)
        return pairs if two == steps else torch.cat([pairs, a[:, two:]], dim=1)

    stage_steps = tuple(n for n in range(two) for _ in (0, 1)) + tuple(range(two, steps))
    points = tuple(n + b for n in range(two) for b in (0, 1)) + tuple(range(two, steps))
    support = (((Y, H), (Y,)), ((STASH, H, HIST(1)), ())) * two + (((Y, H), ()),) * (steps - two)
    return _Built(stage_steps, points, interleave(p_a, p_b), (True,) * len(points), interleave(q_a, q_b),
                  interleave(first, second), support, (True, True) * two + (False,) * (steps - two))


def _ab_variable(tau: Tensor, steps: slice, order: int) -> list[Tensor]:
    """Exact variable-step Adams-Bashforth weights (newest first) over [tau_n, tau_{n+1}] for every step n
    in ``steps``, ``[B, len(steps)]`` each.

    Weight j = mean over the step of the Lagrange basis polynomial through tau_n, ..., tau_{n-order+1};
    2-point Gauss-Legendre integrates these cubic (or lower) polynomials exactly.
    """
    nodes = [_cols(tau, steps, -j) for j in range(order)]
    a, b = _cols(tau, steps, 0), _cols(tau, steps, 1)
    gauss = [(a + b) / 2 + (b - a) / 2 * g for g in (-1 / math.sqrt(3), 1 / math.sqrt(3))]
    weights = []
    for j in range(order):
        w = torch.zeros_like(a)
        for x in gauss:
            basis = torch.ones_like(a)
            for m in range(order):
                if m != j:
                    basis = basis * (x - nodes[m]) / (nodes[j] - nodes[m])
            w = w + 0.5 * basis
        weights.append(w)
    return weights


def _ipndm_orders(steps: int, order: int, first: int) -> list[int]:
    """iPNDM's order per step: lower-order warm-up from the first usable step."""
    return [min(order, n + 1 - first) if n >= first else 1 for n in range(steps)]


def _built_ipndm(pt: _Points, steps: int, *, order: int, first: int, variable: bool = False,
                 **_: object) -> _Built:
    """iPNDM over every step at once: ``z' = z + dtau sum_j w_j g_j`` in the frame, written in state
    coordinates (``y = rho z``), with ``g = (z - x0) / tau`` and the weights ``w`` fixed Adams-Bashforth
    ones or, ``variable``, the exact variable-step ones of each step's own nodes."""
    orders = _ipndm_orders(steps, order, first)
    rho0, rho1, tau0 = pt.rho[:, :-1], pt.rho[:, 1:], pt.tau[:, :-1]
    p, q = 1.0 / (rho0 * tau0), -1.0 / tau0          # the frame derivative g = p y + q x0
    scale = rho1 * (pt.tau[:, 1:] - tau0)             # rho' dtau
    zero = torch.zeros_like(scale)
    weights = {}  # per run, its steps' weights (newest first)
    for k, run in _runs(orders):
        weights[run.start] = (_ab_variable(pt.tau, run, k) if variable
                              else [_cols(scale, run, 0) * c for c in _AB[k]])
    cols: list[Tensor | None] = [rho1 / rho0, None]
    for j in range(max(orders)):  # weight j of each step's order (0 past it), newest derivative first
        def column(k: int, run: slice, j: int = j) -> Tensor:
            if j >= k:
                return zero[:, run]
            w = weights[run.start][j]
            return _cols(scale, run, 0) * w if variable else w
        cols.append(_by_run(orders, column))
    return _one_stage_per_step(orders, p, q, cols)


def _lower_order(n: int, steps: int, order: int, first: int, lower_order_final: bool,
                 final_zero: bool) -> int:
    """diffusers' DPM-Solver++ order rule: warm-up, then lower-order final steps for short grids."""
    k = min(order, n + 1 - first) if n >= first else 1
    short = lower_order_final and steps < 15
    if n == steps - 1 and (short or final_zero):
        k = 1
    if n == steps - 2 and short:
        k = min(k, 2)
    return k


def _built_exponential(pt: _Points, steps: int, *, order: int, first: int, lower_order_final: bool,
                       final_zero: bool, **_: object) -> _Built:
    """Euler (order 1) and DPM-Solver++ 2M / 3M over every step at once: the exact exponential Euler row
    ``y' = (s'/s) y + c x0`` with ``c = alpha' - alpha s'/s``, plus 2M's midpoint correction
    ``c (x0 - x0_prev) / (2 r)`` (``r = h0 / h``) or 3M's two differences, per step's order (diffusers'
    warm-up and lower-order final steps)."""
    orders = [_lower_order(n, steps, order, first, lower_order_final, final_zero) for n in range(steps)]
    ratio = pt.s[:, 1:] / pt.s[:, :-1]
    c = pt.alpha[:, 1:] - pt.alpha[:, :-1] * ratio
    h = pt.steps_h()
    kmax = max(orders)
    cols: list[Tensor | None] = [ratio, None, c, None, None][:3 + kmax - 1]
    if kmax >= 2:
        h0 = torch.cat([h[:, :1], h[:, :-1]], dim=1)          # h of the step before (column 0 unused)
        half_inv_r = h / (2 * h0)
        alpha1 = pt.alpha[:, 1:]
        if kmax == 3:
            h1 = torch.cat([h[:, :2], h[:, :-2]], dim=1)      # two steps before (columns 0, 1 unused)
            r0, r1 = h0 / h, h1 / h
            em1 = torch.expm1(-h)
            phi2 = alpha1 * (em1 / h + 1)
            phi3 = alpha1 * ((em1 + h) / (h * h) - 0.5)
            w, v = r0 / (r0 + r1), 1 / (r0 + r1)
            a = phi2 * (1 + w) - phi3 * v    # coefficient of D1_0 = (m0 - m1) / r0
            b = -phi2 * w + phi3 * v         # coefficient of D1_1 = (m1 - m2) / r1
        zero = torch.zeros_like(c)
        used = set(orders)
        newest = {1: c, 2: c * (1 + half_inv_r) if 2 in used else None, 3: c + a / r0 if 3 in used else None}
        previous = {1: zero, 2: -c * half_inv_r if 2 in used else None,
                    3: -a / r0 + b / r1 if 3 in used else None}
        cols[H] = _by_run(orders, lambda k, sl: newest[k][:, sl])
        cols[HIST(1)] = _by_run(orders, lambda k, sl: previous[k][:, sl])
        if kmax == 3:
            oldest = -b / r1
            cols[HIST(2)] = _by_run(orders, lambda k, sl: (oldest if k == 3 else zero)[:, sl])
    return _one_stage_per_step(orders, None, torch.ones_like(c), cols)


def _unipc_b(h: Tensor, variant: str, order: int) -> tuple[Tensor, Tensor, list[Tensor]]:
    """UniPC (data prediction): h*phi_1 = expm1(-h), B(h) and the right-hand sides b_1..b_order."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    h_phi_k, fact, b = h_phi_1 / hh - 1, 1.0, []
    for i in range(1, order + 1):
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return h_phi_1, b_h, b


def _unipc_rhos(rks: list[Tensor], b: list[Tensor], predictor: bool) -> list[Tensor]:
    """Solve the UniPC order conditions sum_j rho_j r_j^i = b_i per sample (batched)."""
    if predictor:  # uses only the history ratios; order 2 is the fixed 1/2 of the reference code
        if len(rks) == 0:
            return []
        if len(rks) == 1:
            return [torch.full_like(b[0], 0.5)]
        r = torch.stack(rks, dim=-1)
        rhs = torch.stack(b[: len(rks)], dim=-1)
    else:
        if len(rks) == 0:
            return [torch.full_like(b[0], 0.5)]
        r = torch.stack([*rks, torch.ones_like(rks[0])], dim=-1)
        rhs = torch.stack(b[: r.shape[-1]], dim=-1)
    mat = torch.stack([r**i for i in range(r.shape[-1])], dim=-2)  # [B, rows=i, cols=j]
    return _cramer(mat, rhs)


def _det(mat: Tensor) -> Tensor:
    """Leibniz determinant of a small ``[..., n, n]`` matrix (n <= 3): elementwise ops, no solver call."""
    n = mat.shape[-1]
    total = torch.zeros_like(mat[..., 0, 0])
    for perm in itertools.permutations(range(n)):
        inversions = sum(perm[i] > perm[j] for i in range(n) for j in range(i + 1, n))
        term = torch.ones_like(total)
        for i, j in enumerate(perm):
            term = term * mat[..., i, j]
        total = total + (-term if inversions % 2 else term)
    return total


def _cramer(mat: Tensor, rhs: Tensor) -> list[Tensor]:
    """Cramer's rule for the tiny UniPC systems: no LAPACK call, so no host sync and CUDA-graph safe."""
    det = _det(mat)
    cols = []
    for j in range(mat.shape[-1]):
        replaced = mat.clone()
        replaced[..., :, j] = rhs
        cols.append(_det(replaced) / det)
    return cols


def _cols(t: Tensor, steps: slice, offset: int) -> Tensor:
    """Columns ``n + offset`` of ``t`` for the steps ``n`` in ``steps`` (a slice: a view, no index tensor)."""
    return t[:, steps.start + offset:steps.stop + offset]


def _unipc_update(pt: _Points, steps: slice, k: int, variant: str, base: Row, newest: Row,
                  older: list[Row], predictor: bool, newer: Row | None = None) -> Row:
    """One UniP (predictor) or UniC (corrector) update over steps n -> n+1 for every n in ``steps`` (which
    share the order ``k``), as a row of ``[B, len(steps)]`` coefficients.

    ``newest`` is the output at sigma_n, ``older[i]`` the one at sigma_{n-1-i}; the corrector also uses
    ``newer`` (the output at sigma_{n+1}).
    """
    h = _cols(pt.lam, steps, 1) - _cols(pt.lam, steps, 0)
    alpha1 = _cols(pt.alpha, steps, 1)
    h_phi_1, b_h, b = _unipc_b(h, variant, k)
    rks = [(_cols(pt.lam, steps, -1 - i) - _cols(pt.lam, steps, 0)) / h for i in range(k - 1)]
    rhos = _unipc_rhos(rks, b, predictor)
    terms = [(_cols(pt.s, steps, 1) / _cols(pt.s, steps, 0), base), (-alpha1 * h_phi_1, newest)]
    for rho, rk, old in zip(rhos, rks, older, strict=False):  # rho * (m_old - m_newest) / r
        terms += [(-alpha1 * b_h * rho / rk, old), (alpha1 * b_h * rho / rk, newest)]
    if not predictor:  # rho_last * (m_newer - m_newest)
        terms += [(-alpha1 * b_h * rhos[-1], newer), (alpha1 * b_h * rhos[-1], newest)]
    return _combine(*terms)


def _built_unipc(pt: _Points, steps: int, *, order: int, variant: str, first: int, corrector: bool,
                 disable_corrector: tuple[int, ...], lower_order_final: bool, **_: object) -> _Built:
    """UniPC over runs of steps that share a structure (predictor order, whether the step's stage also
    corrects the previous step, and that step's order): each run's rows in one go. Stage n corrects the
    state predicted by step n - 1 with its own output (UniC, kept in the stash), then predicts step n from
    the corrected state (UniP)."""
    orders = []
    for n in range(steps):
        k = min(order, n + 1 - first) if n >= first else 1
        orders.append(min(k, steps - n) if lower_order_final else k)
    corrects = [n > 0 and corrector and (n - 1) not in disable_corrector and n - 1 >= first
                for n in range(steps)]
    keys = [(orders[n], corrects[n], orders[n - 1] if corrects[n] else 0) for n in range(steps)]
    bsz = pt.sigma.shape[0]
    runs, start = [], 0
    for n in range(1, steps + 1):
        if n == steps or keys[n] != keys[start]:
            runs.append((keys[start], slice(start, n)))
            start = n
    parts = []
    for (k, correct, kc), run in runs:
        ones = pt.sigma.new_ones(bsz, run.stop - run.start)

        def unit(i: int, ones: Tensor = ones) -> Row:
            return {i: ones}

        if correct:  # the previous steps, corrected with this stage's output (slot H)
            before = slice(run.start - 1, run.stop - 1)
            corrected = _unipc_update(pt, before, kc, variant, unit(STASH), unit(HIST(1)),
                                      [unit(HIST(2 + i)) for i in range(kc - 1)], False, newer=unit(H))
        else:
            corrected = unit(Y)
        predicted = _unipc_update(pt, run, k, variant, corrected, unit(H),
                                  [unit(HIST(1 + i)) for i in range(k - 1)], True)
        parts.append((run, predicted, corrected))
    width = 3 + max(i - H for _, y, c in parts for row in (y, c) for i in row if i >= H)
    coef, support = [], []
    for run, predicted, corrected in parts:
        zero = pt.sigma.new_zeros(bsz, run.stop - run.start)
        rows = [torch.stack([row.get(i, zero) for i in range(width)], dim=-1)
                for row in (predicted, corrected)]
        coef.append(torch.stack(rows, dim=2))
        support += [(tuple(sorted(predicted)), tuple(sorted(corrected)))] * (run.stop - run.start)
    q = pt.sigma.new_ones(bsz, steps)
    every = tuple(range(steps))
    return _Built(every, every, torch.zeros_like(q), (False,) * steps, q,
                  coef[0] if len(coef) == 1 else torch.cat(coef, dim=1), tuple(support), (True,) * steps)


# ------------------------------------------------------------------------------------------- assembly
def _is_int(value: object) -> bool:
    """An integer option value (Python or numpy ints), not a bool or a float."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def build_table(solver: str, grid: Tensor, family: NoiseFamily, *, prediction: Prediction = "x0",
                shift: Tensor | None = None, scale: Tensor | None = None, frame: Frame | None = None,
                order: int | None = None, variant: str = "bh2", corrector: bool = True,
                disable_corrector: tuple[int, ...] | list[int] = (),
                lower_order_final: bool = True, final_zero: bool | None = None,
                infinite_start: bool | None = None, check_finite: bool = True) -> SolverTable:
    """Coefficient table of ``solver`` for a validated ``[B, N+1]`` grid (float64 math, float64 result).

    ``shift`` / ``scale`` are INDIS's ``dtau`` / ``gamma``, ``[B, N]`` (per step; both evaluations of a Heun
    step share them; see the module docstring for the corrected call). ``order``
    applies to ipndm/ipndm_v (1..4, default 4) and unipc (1..3, default 2, like diffusers); the default is
    capped at the number of steps, an explicit order above it is an error. ``variant`` is UniPC's
    ``bh1``/``bh2``. ``lower_order_final`` follows diffusers (DPM-Solver++: last steps of grids shorter than
    15; UniPC: order <= steps left); a final step to sigma = 0 is always first order.

    The table's structure depends on two facts about the grid, read from its values unless given:
    ``final_zero`` (every row ends at sigma = 0) and ``infinite_start`` (some row starts at sigma = inf, a
    flow model's t = 1). Passing both, with ``check_finite=False``, makes the build free of host syncs (it
    only launches device ops), so it can run inside a CUDA graph; the caller then vouches for the flags.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is unknown; choose one of {SOLVERS}")
    steps = grid.shape[-1] - 1
    grid = grid.to(torch.float64)
    frame = frame or ("flow" if isinstance(family, Flow) else "ve")
    if frame not in ("ve", "flow"):
        raise ValueError(f"frame={frame!r} is not 've' or 'flow'")
    if solver in ("ipndm", "ipndm_v", "unipc"):
        if order is None:
            order = min(DEFAULT_ORDER[solver], steps)
        elif not _is_int(order) or not 1 <= order <= MAX_ORDER[solver]:
            raise ValueError(f"order={order!r} for {solver} must be an int in 1..{MAX_ORDER[solver]}")
        elif order > steps:
            raise ValueError(f"order={order} needs at least {order} steps, but sigmas has {steps} "
                             f"(NFE too small for the requested order)")
    elif order is not None and (not _is_int(order) or order != MAX_ORDER[solver]):
        raise ValueError(f"order={order!r} is not adjustable for {solver} (fixed at {MAX_ORDER[solver]})")
    else:
        order = MAX_ORDER[solver]
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant={variant!r} must be 'bh1' or 'bh2'")

    if infinite_start is None:
        infinite_start = bool(torch.isinf(grid[:, 0]).any())
    if infinite_start and solver in DERIVATIVE_SOLVERS and frame == "ve":
        raise ValueError(f"{solver} in the 've' frame cannot start at sigma = inf; use frame='flow' "
                         "(the default for flow models) or a finite sigma_max")
    # lambda = -inf there: exponential integrators cannot difference across it; frame solvers (tau = 1) can.
    first = 1 if infinite_start and solver not in DERIVATIVE_SOLVERS else 0
    if final_zero is None:
        final_zero = bool((grid[:, -1] == 0).all())
    pt = _Points(grid, family, frame)
    builders = {"euler": _built_exponential, "heun": _built_heun, "ipndm": _built_ipndm,
                "ipndm_v": _built_ipndm, "dpmpp_2m": _built_exponential, "dpmpp_3m": _built_exponential,
                "unipc": _built_unipc}
    built = builders[solver](pt, steps, order=order, first=first, variable=solver == "ipndm_v",
                             lower_order_final=lower_order_final,
                             final_zero=final_zero, variant=variant, corrector=corrector,
                             disable_corrector=tuple(disable_corrector))
    return _assemble(solver, grid, family, prediction, built, shift, scale, check_finite)


def _assemble(solver: str, grid: Tensor, family: NoiseFamily, prediction: Prediction, built: _Built,
              shift: Tensor | None, scale: Tensor | None, check_finite: bool) -> SolverTable:
    """The table from a solver's stages: the corrected network call (shift, scale) and the prediction type
    folded into ``conv``, the network's input scale and evaluation points."""
    def per_stage(t: Tensor, index: tuple[int, ...]) -> Tensor:  # [B, N(+1)] -> [B, S], static indices
        if index == tuple(range(len(index))):
            return t[:, :len(index)]
        return torch.stack([t[:, i] for i in index], dim=1)

    sigma_n = per_stage(grid, built.points)                                 # [B, S]
    dtau = torch.zeros_like(sigma_n) if shift is None else per_stage(shift.to(grid), built.steps)
    sigma_eval = sigma_n * torch.exp(dtau)
    alpha_n = family.alpha(sigma_n)
    start = torch.isinf(sigma_n)  # a flow model's t = 1: eps is the state itself, nothing to shift or scale
    same = (sigma_eval == sigma_n) | start  # no shift (also sigma = inf, where the alpha ratio is 0/0)
    alpha_safe = torch.where(start, torch.ones_like(alpha_n), alpha_n)
    in_scale = torch.where(same, torch.ones_like(sigma_n), family.alpha(sigma_eval) / alpha_safe)
    a, b = raw_to_x0(prediction, family, sigma_eval)                        # D = a * x_eval + b * raw
    gamma = torch.ones_like(sigma_n) if scale is None else per_stage(scale.to(grid), built.steps)
    # eps_hat = gamma (x - D) / sigma_eval; x0_hat = x - sigma_n eps_hat = (1 - k) x + k D, VE x = y / alpha_n
    k = torch.where(start, torch.ones_like(gamma), gamma * torch.exp(-dtau))
    x_weight = torch.where(start, torch.zeros_like(k), (1 - k) / alpha_safe)
    p, q, coef = built.p, built.q, built.coef
    conv = torch.stack([p + q * (x_weight + k * a * in_scale), q * k * b], dim=-1)
    history = coef.shape[-1] - 3
    uses_stash = any(built.writes_stash)
    corrected = shift is not None or scale is not None
    uses_state = tuple(used or prediction != "x0" or corrected for used in built.p_used)
    scales_raw = uses_state
    scaled_input = shift is not None and not isinstance(family, VE)
    if check_finite:
        bad = ~torch.isfinite(conv).all(-1).all(-1) | ~torch.isfinite(coef).flatten(1).all(-1)
        if bool(bad.any()):
            bad_rows = bad.nonzero().flatten().tolist()
            raise ValueError(f"{solver}: non-finite coefficients for sample(s) {bad_rows} "
                             f"(prediction={prediction!r} at "
                             f"sigma_eval={sigma_eval[bad][:, :2].tolist()}...): "
                             "check sigmas and shift for this family and prediction type")
    return SolverTable(solver, grid, sigma_eval, in_scale, conv, coef, built.support, uses_state,
                       scales_raw, scaled_input, built.steps, built.points, history, uses_stash)
