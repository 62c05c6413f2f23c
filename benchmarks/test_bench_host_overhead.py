"""pytest-benchmark mirror of ``bench_host_overhead.py`` (same methods, same names, one loop per round).

Run:  pytest benchmarks/test_bench_host_overhead.py --benchmark-only [--benchmark-group-by=param:batch]

pytest-benchmark reports whole-loop time (``--steps`` steps per round, 10 here); divide by 10 for µs/step.
The standalone script prints µs/step and the ratios directly; use it for the acceptance numbers.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")
diffusers = pytest.importorskip("diffusers")

from bench_host_overhead import (  # noqa: E402
    SHAPE,
    bare_dpmpp_2m,
    bare_dpmpp_2m_coefs,
    eps_model,
    kd_model,
    ragged_grid,
)

import indis  # noqa: E402
from indis.engine.core.sampling import run_table  # noqa: E402

STEPS = 10
BATCHES = [1, 16]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(prev)


def _x(batch: int) -> torch.Tensor:
    return torch.randn((batch, *SHAPE), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_diffusers_step_loop(benchmark, name: str, batch: int) -> None:
    """diffusers ``step()`` loop; ``set_timesteps`` runs in the untimed setup of each round."""
    sched = (diffusers.DPMSolverMultistepScheduler(solver_order=2) if name == "dpmpp_2m"
             else diffusers.UniPCMultistepScheduler(solver_order=2, solver_type="bh2"))
    x = _x(batch)

    def setup():
        sched.set_timesteps(STEPS)
        return (x,), {}

    def loop(xt: torch.Tensor) -> torch.Tensor:
        for t in sched.timesteps:
            xt = sched.step(eps_model(xt, t), t, xt).prev_sample
        return xt

    out = benchmark.pedantic(loop, setup=setup, rounds=200, iterations=1, warmup_rounds=10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("batch", BATCHES)
def test_bare_torch_dpmpp_2m_loop(benchmark, batch: int) -> None:
    x = _x(batch)
    sig = indis.get_sigmas("edm", STEPS, 0.002, 80.0).tolist()
    sigma_in = [torch.full((batch,), s) for s in sig[:-1]]
    coefs = bare_dpmpp_2m_coefs(sig)
    out = benchmark(bare_dpmpp_2m, kd_model, x, sigma_in, coefs)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("grid_kind", ["shared", "ragged"])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc", "ipndm"])
def test_indis_run_table_loop(benchmark, solver: str, grid_kind: str, batch: int) -> None:
    x = _x(batch)
    grid = indis.get_sigmas("edm", STEPS, 0.002, 80.0) if grid_kind == "shared" else ragged_grid(batch, STEPS)
    plan = indis.prepare(kd_model, x, grid, solver)
    out = benchmark(run_table, plan, x)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("grid_kind", ["shared", "ragged"])
def test_indis_sample_end_to_end(benchmark, grid_kind: str, batch: int) -> None:
    x = _x(batch)
    grid = indis.get_sigmas("edm", STEPS, 0.002, 80.0) if grid_kind == "shared" else ragged_grid(batch, STEPS)
    out = benchmark(indis.sample, kd_model, x, grid, "dpmpp_2m")
    assert torch.isfinite(out).all()
