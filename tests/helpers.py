"""Builders shared by the test modules: the kernel device, the solver cases, ragged grids, toy models, the
environment of bit-exact child processes and the ragged kernel's tables and buffers.

Test modules import shared code from here (and the re-implemented algorithms of other libraries from
``tests.reference``), never from one another.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import indis
from indis.engine.core.sampling import prepare
from indis.engine.core.solvers import SOLVERS, SolverTable
from indis.engine.studies.convergence import small_mixture
from indis.engine.testbeds.mixtures import GaussianMixture

#: The repository's root (the tests read committed files under it).
ROOT = Path(__file__).resolve().parents[1]

#: Where kernel tests run: CUDA when Triton kernels run compiled (the GPU suite), else the CPU interpreter.
KERNEL_DEVICE = torch.device(
    "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")

#: Solver + options cases of the suites that run every solver (ragged consistency, kernels, host reads):
#: the hand-picked cases below (their positions are relied on), then every other registered solver with its
#: defaults, so a solver added to ``SOLVERS`` is covered by being registered.
SOLVER_CASES = [
    ("euler", {}), ("heun", {}), ("ipndm", {}), ("ipndm", {"order": 2}), ("ipndm_v", {}),
    ("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {"variant": "bh1", "order": 3}),
    ("unipc", {"variant": "bh2", "order": 3}), ("unipc", {"variant": "bh2", "corrector": False}),
]
SOLVER_CASES += [(s, {}) for s in SOLVERS if s not in {name for name, _ in SOLVER_CASES}]
IDS = [f"{s}-{'-'.join(f'{k}{v}' for k, v in o.items())}" for s, o in SOLVER_CASES]


def ragged_grids(bsz: int, steps: int, seed: int, smin: float = 0.002, smax: float = 80.0) -> torch.Tensor:
    """Random strictly descending grids, one per sample, through the monotone logit map."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(bsz, steps + 1, generator=g, dtype=torch.float64)
    return indis.grid_from_logits(logits, smin, smax, space="lambda")


def flow_velocity(gmm: GaussianMixture):
    """Exact velocity eps - x0 of a GMM in flow coordinates, finite at t = 1."""
    def velocity(x_t, t):
        return (x_t - gmm.denoise_scaled(x_t, 1 - t, t)) / t.view(-1, 1)

    return velocity


def ok_args():
    """A valid (model, x, sigmas) for the input-check tests: identity x0 model, [2, 3] zeros, 2 steps."""
    return (lambda x, s: x), torch.zeros(2, 3), torch.tensor([10.0, 1.0, 0.1])


def toy_mixture() -> GaussianMixture:
    """Three narrow components in 2-d (the quality harness's and GITS's cheap exact model)."""
    means = torch.tensor([[-1.0, 0.3], [0.8, 0.9], [0.2, -1.1]], dtype=torch.float64)
    return GaussianMixture(means, 0.02)


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
    """Exact denoiser of N(mu, I) data with mu = 0.5 (a cheap differentiable backbone)."""
    s2 = sigma.view(-1, *[1] * (x.ndim - 1)) ** 2
    return (x + 0.5 * s2) / (1 + s2)


def subprocess_env() -> dict[str, str]:
    """The environment of a child Python process that must reproduce this one's numbers bit for bit."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    return env


# ------------------------------------------------------------------------------- the ragged kernel's inputs
def _identity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x


def kernel_table(solver: str, opts: dict, bsz: int, steps: int = 6, seed: int = 0,
                 device: torch.device = KERNEL_DEVICE) -> tuple[SolverTable, torch.Tensor]:
    """A float64 coefficient table over random per-sample grids, shifts and scales, and its network times."""
    g = torch.Generator().manual_seed(seed)
    grids = ragged_grids(bsz, steps, seed=seed + 1)
    shift = 0.1 * torch.randn(bsz, steps, generator=g, dtype=torch.float64)
    scale = 1 + 0.05 * torch.randn(bsz, steps, generator=g, dtype=torch.float64)
    plan = prepare(_identity, torch.zeros(bsz, 1, dtype=torch.float64, device=device), grids.to(device),
                   solver, shift=shift.to(device), scale=scale.to(device), **opts)
    return plan.table, plan.denoiser.time(plan.table.sigma_eval)


def kernel_buffers(table: SolverTable, shape: tuple[int, ...], seed: int,
                   device: torch.device = KERNEL_DEVICE) -> dict[str, torch.Tensor | None]:
    """Random float64 state, raw output, stash and history buffers for ``table``'s batch."""
    g = torch.Generator().manual_seed(seed)
    bsz = table.grid.shape[0]

    def rnd(*s: int) -> torch.Tensor:
        return 3 * torch.randn(*s, generator=g, dtype=torch.float64).to(device)

    return {"y": rnd(bsz, *shape), "raw": rnd(bsz, *shape),
            "stash": rnd(bsz, *shape) if table.uses_stash else None,
            "hist": rnd(table.history, bsz, *shape) if table.history else None}


def loop_case(solver: str, opts: dict, device: torch.device = KERNEL_DEVICE):
    """A whole ragged sampling run: float64 x_T and ``plan(x)`` (per-sample grids, shift, scale)."""
    model = small_mixture().to(device)
    bsz, steps = 5, 6
    g = torch.Generator().manual_seed(1)
    x64 = (torch.randn(bsz, 6, generator=g, dtype=torch.float64) * 80.0).to(device)
    grids = ragged_grids(bsz, steps, seed=2).to(device)
    # within the predictor's bounds (|dtau| < 0.1, |gamma - 1| < 0.05), as a tuned head's would be
    shift = (0.1 * torch.tanh(torch.randn(bsz, steps, generator=g, dtype=torch.float64))).to(device)
    scale = (1 + 0.05 * torch.tanh(torch.randn(bsz, steps, generator=g, dtype=torch.float64))).to(device)

    def plan(x: torch.Tensor):
        return prepare(model, x, grids, solver, shift=shift, scale=scale, **opts)

    return x64, plan
