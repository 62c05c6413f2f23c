"""The step-by-step construction of the solvers' coefficient tables, as indis built them before the tables
were vectorised over steps: one row per stage, each a dict of per-sample coefficients. Kept as the reference
the vectorised ``solvers.build_table`` is tested against (``reference_table``: same tables to 1e-12)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from indis.engine.core.families import VE, Flow, NoiseFamily, Prediction, raw_to_x0
from indis.engine.core.solvers import (  # the small shared pieces; the step-by-step structure is below
    _AB,
    DEFAULT_ORDER,
    DERIVATIVE_SOLVERS,
    HIST,
    MAX_ORDER,
    STASH,
    Frame,
    H,
    Row,
    SolverTable,
    Y,
    _combine,
    _lower_order,
    _unipc_b,
    _unipc_rhos,
)


@dataclass
class _Stage:
    step: int
    point: int           # grid index where the network is evaluated
    p: Tensor | None     # h = p * y + q * x0 (p None: structurally zero)
    q: Tensor
    y_row: Row
    stash_row: Row | None = None


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

    def step_h(self, n: int) -> Tensor:
        return self.lam[:, n + 1] - self.lam[:, n]


def _euler(pt: _Points, n: int) -> Row:
    """Exact exponential Euler (DDIM): y' = (s'/s) y + (alpha' - alpha s'/s) x0."""
    ratio = pt.s[:, n + 1] / pt.s[:, n]
    return {Y: ratio, H: pt.alpha[:, n + 1] - pt.alpha[:, n] * ratio}


def _stages_euler(pt: _Points, steps: int, **_: object) -> list[_Stage]:
    return [_Stage(n, n, None, torch.ones_like(pt.sigma[:, 0]), _euler(pt, n)) for n in range(steps)]


def _frame_conv(pt: _Points, i: int) -> tuple[Tensor, Tensor]:
    """Frame derivative g = (z - x0) / tau with z = y / rho, as (p, q)."""
    return 1.0 / (pt.rho[:, i] * pt.tau[:, i]), -1.0 / pt.tau[:, i]


def _frame_step(pt: _Points, n: int, start: int, derivs: Row) -> Row:
    """z' = z + dtau * sum(c_j g_j), in state coordinates, from the state in slot ``start``."""
    rho0, rho1 = pt.rho[:, n], pt.rho[:, n + 1]
    dtau = pt.tau[:, n + 1] - pt.tau[:, n]
    return _combine((rho1 / rho0, {start: torch.ones_like(rho0)}), (rho1 * dtau, derivs))


def _stages_heun(pt: _Points, steps: int, *, final_zero: bool, **_: object) -> list[_Stage]:
    stages = []
    for n in range(steps):
        p, q = _frame_conv(pt, n)
        one = torch.ones_like(p)
        if final_zero and n == steps - 1:  # EDM: Euler for the step to sigma = 0
            stages.append(_Stage(n, n, p, q, _frame_step(pt, n, Y, {H: one})))
            continue
        stages.append(_Stage(n, n, p, q, _frame_step(pt, n, Y, {H: one}), stash_row={Y: one}))
        p2, q2 = _frame_conv(pt, n + 1)
        stages.append(_Stage(n, n + 1, p2, q2, _frame_step(pt, n, STASH, {HIST(1): 0.5 * one, H: 0.5 * one}),
                             stash_row={}))
    return stages


def _ab_variable(tau: Tensor, n: int, order: int) -> list[Tensor]:
    """Exact variable-step Adams-Bashforth weights (newest first) over [tau_n, tau_{n+1}].

    Weight j = mean over the step of the Lagrange basis polynomial through tau_n, ..., tau_{n-order+1};
    2-point Gauss-Legendre integrates these cubic (or lower) polynomials exactly.
    """
    nodes = [tau[:, n - j] for j in range(order)]
    a, b = tau[:, n], tau[:, n + 1]
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


def _stages_ipndm(pt: _Points, steps: int, *, order: int, variable: bool, first: int,
                  **_: object) -> list[_Stage]:
    stages = []
    for n in range(steps):
        p, q = _frame_conv(pt, n)
        k = min(order, n + 1 - first) if n >= first else 1
        if variable:
            weights = _ab_variable(pt.tau, n, k)
        else:
            weights = [torch.full_like(p, c) for c in _AB[k]]
        derivs = {H if j == 0 else HIST(j): w for j, w in enumerate(weights)}
        stages.append(_Stage(n, n, p, q, _frame_step(pt, n, Y, derivs)))
    return stages


def _stages_dpmpp(pt: _Points, steps: int, *, order: int, first: int, lower_order_final: bool,
                  final_zero: bool, **_: object) -> list[_Stage]:
    stages = []
    for n in range(steps):
        k = _lower_order(n, steps, order, first, lower_order_final, final_zero)
        row = _euler(pt, n)
        c = row[H]  # alpha' (1 - e^{-h})
        if k >= 2:
            h = pt.step_h(n)
            h0 = pt.step_h(n - 1)
            if k == 2:  # midpoint form: x0 + (x0 - x0_prev) / (2 r), r = h0 / h
                half_inv_r = h / (2 * h0)
                row = {Y: row[Y], H: c * (1 + half_inv_r), HIST(1): -c * half_inv_r}
            else:
                h1 = pt.step_h(n - 2)
                r0, r1 = h0 / h, h1 / h
                em1 = torch.expm1(-h)
                phi2 = pt.alpha[:, n + 1] * (em1 / h + 1)
                phi3 = pt.alpha[:, n + 1] * ((em1 + h) / (h * h) - 0.5)
                w, v = r0 / (r0 + r1), 1 / (r0 + r1)
                a = phi2 * (1 + w) - phi3 * v    # coefficient of D1_0 = (m0 - m1) / r0
                b = -phi2 * w + phi3 * v         # coefficient of D1_1 = (m1 - m2) / r1
                row = {Y: row[Y], H: c + a / r0, HIST(1): -a / r0 + b / r1, HIST(2): -b / r1}
        stages.append(_Stage(n, n, None, torch.ones_like(c), row))
    return stages


def _unipc_update(pt: _Points, n: int, k: int, variant: str, base: Row, newest: Row,
                  older: list[Row], predictor: bool, newer: Row | None = None) -> Row:
    """One UniP (predictor) or UniC (corrector) update over step n -> n+1, as a row.

    ``newest`` is the output at sigma_n, ``older[i]`` the one at sigma_{n-1-i}; the corrector also uses
    ``newer`` (the output at sigma_{n+1}).
    """
    h = pt.step_h(n)
    alpha1 = pt.alpha[:, n + 1]
    h_phi_1, b_h, b = _unipc_b(h, variant, k)
    rks = [(pt.lam[:, n - 1 - i] - pt.lam[:, n]) / h for i in range(k - 1)]
    rhos = _unipc_rhos(rks, b, predictor)
    terms = [(pt.s[:, n + 1] / pt.s[:, n], base), (-alpha1 * h_phi_1, newest)]
    for rho, rk, old in zip(rhos, rks, older, strict=False):  # rho * (m_old - m_newest) / r
        terms += [(-alpha1 * b_h * rho / rk, old), (alpha1 * b_h * rho / rk, newest)]
    if not predictor:  # rho_last * (m_newer - m_newest)
        terms += [(-alpha1 * b_h * rhos[-1], newer), (alpha1 * b_h * rhos[-1], newest)]
    return _combine(*terms)


def _stages_unipc(pt: _Points, steps: int, *, order: int, variant: str, first: int, corrector: bool,
                  disable_corrector: tuple[int, ...], lower_order_final: bool, **_: object) -> list[_Stage]:
    def unit(i: int) -> Row:
        return {i: torch.ones_like(pt.sigma[:, 0])}

    stages, orders = [], []
    for n in range(steps):
        k = min(order, n + 1 - first) if n >= first else 1
        if lower_order_final:
            k = min(k, steps - n)
        orders.append(k)
        # UniC: correct the state predicted by the previous step with this stage's output (slot H).
        if n > 0 and corrector and (n - 1) not in disable_corrector and n - 1 >= first:
            kc = orders[n - 1]
            corrected = _unipc_update(pt, n - 1, kc, variant, unit(STASH), unit(HIST(1)),
                                      [unit(HIST(2 + i)) for i in range(kc - 1)], False, newer=unit(H))
        else:
            corrected = unit(Y)
        # UniP from the corrected state; this stage's output is the newest.
        older = [unit(HIST(1 + i)) for i in range(k - 1)]
        predicted = _unipc_update(pt, n, k, variant, corrected, unit(H), older, True)
        stages.append(_Stage(n, n, None, torch.ones_like(pt.sigma[:, 0]), predicted, stash_row=corrected))
    return stages


def reference_table(solver: str, grid: Tensor, family: NoiseFamily, *, prediction: Prediction = "x0",
                    shift: Tensor | None = None, scale: Tensor | None = None, frame: Frame | None = None,
                    order: int | None = None, variant: str = "bh2", corrector: bool = True,
                    disable_corrector: tuple[int, ...] | list[int] = (), lower_order_final: bool = True,
                    final_zero: bool | None = None, infinite_start: bool | None = None,
                    check_finite: bool = True) -> SolverTable:
    """``solvers.build_table`` as it was built step by step (same arguments, same table)."""
    steps = grid.shape[-1] - 1
    grid = grid.to(torch.float64)
    frame = frame or ("flow" if isinstance(family, Flow) else "ve")
    if frame not in ("ve", "flow"):
        raise ValueError(f"frame={frame!r} is not 've' or 'flow'")
    if solver in ("ipndm", "ipndm_v", "unipc"):
        if order is None:
            order = min(DEFAULT_ORDER[solver], steps)
        elif not isinstance(order, int) or not 1 <= order <= MAX_ORDER[solver]:
            raise ValueError(f"order={order!r} for {solver} must be an int in 1..{MAX_ORDER[solver]}")
        elif order > steps:
            raise ValueError(f"order={order} needs at least {order} steps, but sigmas has {steps} "
                             f"(NFE too small for the requested order)")
    elif order is not None and (not isinstance(order, int) or order != MAX_ORDER[solver]):
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
    builders = {"euler": _stages_euler, "heun": _stages_heun, "ipndm": _stages_ipndm,
                "ipndm_v": _stages_ipndm, "dpmpp_2m": _stages_dpmpp, "dpmpp_3m": _stages_dpmpp,
                "unipc": _stages_unipc}
    stages = builders[solver](pt, steps, order=order, variable=solver == "ipndm_v", first=first,
                              lower_order_final=lower_order_final, final_zero=final_zero, variant=variant,
                              corrector=corrector, disable_corrector=tuple(disable_corrector))
    return _assemble(solver, grid, family, prediction, stages, shift, scale, check_finite)


def _assemble(solver: str, grid: Tensor, family: NoiseFamily, prediction: Prediction, stages: list[_Stage],
              shift: Tensor | None, scale: Tensor | None, check_finite: bool) -> SolverTable:
    bsz = grid.shape[0]
    rows = [st.y_row for st in stages] + [st.stash_row for st in stages if st.stash_row is not None]
    history = max([i - H for row in rows for i in row if i > H], default=0)
    uses_stash = any(st.stash_row is not None for st in stages)
    width = 3 + history
    def per_stage(t: Tensor, index: str) -> Tensor:  # [B, N(+1)] -> [B, S] (static indices: no H2D copy)
        return torch.stack([t[:, getattr(st, index)] for st in stages], dim=1)

    sigma_n = per_stage(grid, "point")                                     # [B, S]
    dtau = torch.zeros_like(sigma_n) if shift is None else per_stage(shift.to(grid), "step")
    sigma_eval = sigma_n * torch.exp(dtau)
    alpha_n = family.alpha(sigma_n)
    start = torch.isinf(sigma_n)  # a flow model's t = 1: eps is the state itself, nothing to shift or scale
    same = (sigma_eval == sigma_n) | start  # no shift (also sigma = inf, where the alpha ratio is 0/0)
    alpha_safe = torch.where(start, torch.ones_like(alpha_n), alpha_n)
    in_scale = torch.where(same, torch.ones_like(sigma_n), family.alpha(sigma_eval) / alpha_safe)
    a, b = raw_to_x0(prediction, family, sigma_eval)                        # D = a * x_eval + b * raw
    gamma = torch.ones_like(sigma_n) if scale is None else per_stage(scale.to(grid), "step")
    # eps_hat = gamma (x - D) / sigma_eval; x0_hat = x - sigma_n eps_hat = (1 - k) x + k D, VE x = y / alpha_n
    k = torch.where(start, torch.ones_like(gamma), gamma * torch.exp(-dtau))
    x_weight = torch.where(start, torch.zeros_like(k), (1 - k) / alpha_safe)
    p = torch.stack([st.p if st.p is not None else torch.zeros_like(st.q) for st in stages], dim=1)
    q = torch.stack([st.q for st in stages], dim=1)
    conv = torch.stack([p + q * (x_weight + k * a * in_scale), q * k * b], dim=-1)
    zero = grid.new_zeros(bsz)
    rows = [(st.y_row, st.stash_row or {}) for st in stages]
    entries = [row.get(i, zero) for pair in rows for row in pair for i in range(width)]
    coef = torch.stack([v.expand(bsz) if isinstance(v, Tensor) else zero + v for v in entries], dim=1)
    coef = coef.reshape(bsz, len(stages), 2, width)
    support = [(tuple(sorted(y_row)), tuple(sorted(s_row))) for y_row, s_row in rows]
    corrected = shift is not None or scale is not None
    uses_state = tuple(st.p is not None or prediction != "x0" or corrected for st in stages)
    scales_raw = tuple(st.p is not None or prediction != "x0" or corrected for st in stages)
    scaled_input = shift is not None and not isinstance(family, VE)
    if check_finite:
        bad = ~torch.isfinite(conv).all(-1).all(-1) | ~torch.isfinite(coef).flatten(1).all(-1)
        if bool(bad.any()):
            bad_rows = bad.nonzero().flatten().tolist()
            raise ValueError(f"{solver}: non-finite coefficients for sample(s) {bad_rows} "
                             f"(prediction={prediction!r} at "
                             f"sigma_eval={sigma_eval[bad][:, :2].tolist()}...): "
                             "check sigmas and shift for this family and prediction type")
    return SolverTable(solver, grid, sigma_eval, in_scale, conv, coef, tuple(support), uses_state,
                       scales_raw, scaled_input, tuple(st.step for st in stages),
                       tuple(st.point for st in stages), history, uses_stash)
