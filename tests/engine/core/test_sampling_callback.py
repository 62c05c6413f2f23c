"""k-diffusion's callback contract ({'x', 'i', 'sigma', 'sigma_hat', 'denoised'}) and ``disable`` (the
progress bar), the same on every backend."""

from __future__ import annotations

import math

import pytest
import torch

import indis
from indis.engine.core.families import Denoiser, VPLinear
from indis.kernels import native
from indis.kernels.ragged_step import triton
from tests.helpers import ragged_grids, toy_mixture

BACKENDS = ["torch"] + ["native"] * native.available() + (["triton"] if triton is not None else [])
MODEL = toy_mixture()


def _reports(backend: str, solver: str, shift: torch.Tensor | None = None) -> list[dict]:
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0)) * 80
    grid = ragged_grids(3, 4, seed=1)
    seen: list[dict] = []
    indis.sample(MODEL, x, indis.Schedule(grid, shift, None), solver, backend=backend,
                 callback=lambda d: seen.append({k: (v.clone() if torch.is_tensor(v) else v)
                                                 for k, v in d.items()}))
    return seen


@pytest.mark.parametrize("solver", ["heun", "unipc", "ipndm"])
def test_every_backend_tells_the_callback_the_same(solver: str) -> None:
    runs = {b: _reports(b, solver) for b in BACKENDS}
    ref = runs["torch"]
    table = indis.build_table(solver, ragged_grids(3, 4, seed=1), indis.VE())
    assert [d["i"] for d in ref] == list(table.step_of_stage)
    for backend, seen in runs.items():
        assert [d["i"] for d in seen] == [d["i"] for d in ref], backend
        for a, b in zip(seen, ref, strict=True):
            assert {"x", "i", "sigma", "sigma_hat", "denoised"} <= set(a)
            for k in ("x", "sigma", "sigma_hat", "denoised"):
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-4, msg=f"{backend} {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_callback_sees_the_state_the_network_saw_and_its_x0(backend: str) -> None:
    """``x`` is the state at the evaluation (stage 0: x_T), ``sigma`` the grid's, ``sigma_hat`` the shifted
    evaluation point and ``denoised`` the model's output there."""
    grid = ragged_grids(3, 4, seed=1).float()
    shift = torch.full((3, 4), 0.05)
    seen = _reports(backend, "euler", shift)
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(0)) * 80
    torch.testing.assert_close(seen[0]["x"], x_T)
    for d in seen:
        torch.testing.assert_close(d["sigma"], grid[:, d["i"]])
        torch.testing.assert_close(d["sigma_hat"], grid[:, d["i"]] * math.exp(0.05))
        torch.testing.assert_close(d["denoised"], MODEL(d["x"], d["sigma_hat"]), rtol=1e-5, atol=1e-4)


def test_denoised_is_the_x0_estimate_for_a_vp_eps_model() -> None:
    def eps_net(x, t):
        return torch.tanh(x) * (1 + t.view(-1, 1) / 1000)

    den = Denoiser(eps_net, VPLinear(), prediction="eps", time_input="t", time_scale=1000.0)
    grid = indis.get_sigmas("edm", 3, 0.02, 40.0, family=den.family)
    x = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seen = []
    indis.sample(den, x, grid, "dpmpp_2m", backend="torch", callback=seen.append)
    for d in seen:
        alpha = den.family.alpha(d["sigma_hat"]).view(-1, 1)
        torch.testing.assert_close(d["denoised"], den(d["x"] / alpha, d["sigma_hat"]), rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_disable_hides_the_progress_bar(backend: str, capsys: pytest.CaptureFixture) -> None:
    x = torch.randn(2, 2, generator=torch.Generator().manual_seed(0)) * 80
    grid = indis.get_sigmas("edm", 3, 0.002, 80.0)
    indis.sample_euler(MODEL, x, grid, disable=True, backend=backend)
    assert capsys.readouterr().err == ""
    indis.sample_euler(MODEL, x, grid, disable=False, backend=backend)
    assert "indis:" in capsys.readouterr().err
    indis.sample(MODEL, x, grid, "euler", backend=backend)  # indis.sample: no bar unless asked
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_callback_gets_copies_and_heuns_second_call_is_at_the_next_point(backend: str) -> None:
    x = torch.randn(2, 2, generator=torch.Generator().manual_seed(0)) * 80
    grid = indis.get_sigmas("edm", 3, 0.002, 80.0)
    want = indis.sample(MODEL, x.clone(), grid, "heun", backend=backend)
    seen = []

    def vandal(d: dict) -> None:
        seen.append((d["i"], d["sigma"].clone(), d["sigma_hat"].clone()))
        d["x"].mul_(0)  # editing the dict's tensors must not change the sample

    x_in = x.clone()
    got = indis.sample(MODEL, x_in, grid, "heun", backend=backend, callback=vandal)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(x_in, x)
    points = [0, 1, 1, 2, 2, 3]  # Heun: step i at sigma_i, then its corrector at sigma_{i+1}
    assert [i for i, _, _ in seen] == [0, 0, 1, 1, 2, 2]
    for (_, sigma, sigma_hat), p in zip(seen, points, strict=True):
        torch.testing.assert_close(sigma, grid[p].float().expand(2))
        torch.testing.assert_close(sigma_hat, sigma)


@pytest.mark.parametrize("solver", ["heun", "unipc", "dpmpp_2m"])
def test_a_step_end_hook_that_edits_the_state_acts_alike_on_every_backend(solver: str) -> None:
    """``run(..., step_end=)`` is called once per grid step (after Heun's second evaluation too) with a copy
    of the state; the state it returns replaces the sample's, on every backend alike."""
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0)) * 80
    grid = ragged_grids(3, 4, seed=1)
    plan = indis.prepare(MODEL, x, grid, solver)
    outs, calls = {}, {}
    for backend in BACKENDS:
        seen = calls.setdefault(backend, [])

        def halve_at_step_1(i: int, y: torch.Tensor, seen=seen) -> torch.Tensor | None:
            seen.append(i)
            y.add_(1.0)  # a copy: editing it without returning it changes nothing
            return y * 0.5 if i == 1 else None

        outs[backend] = indis.run(plan, x, backend=backend, step_end=halve_at_step_1)
    plain = indis.run(plan, x, backend="torch")
    for backend, out in outs.items():
        assert calls[backend] == [0, 1, 2, 3], backend
        torch.testing.assert_close(out, outs["torch"], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(outs["torch"], plain, atol=1e-2)
    with pytest.raises(ValueError, match="step_end returned"):
        indis.run(plan, x, backend="torch", step_end=lambda i, y: y[:1])
