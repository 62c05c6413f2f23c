"""Parity of whole sampling loops: indis solvers vs. diffusers schedulers on identical, shared grids.

Each test runs the standard diffusers loop (``set_timesteps``; per timestep ``scale_model_input`` -> network
-> ``step``) and the corresponding ``indis.sample`` call on the *same* grid (taken from the scheduler itself,
one grid for all samples), from the same ``x_T``, with the same deterministic network. The network is
analytic: the exact posterior mean of a 3-component isotropic Gaussian mixture on R^32
(``testbeds.GaussianMixture.denoise_scaled``, exact in any family's coordinate), written as the eps / v /
x0 / flow-velocity output each scheduler expects, computed in float64 and returned in the caller's dtype.
It maps its time input back to a noise level itself, so both sides evaluate the same function of (state,
noise level).

Tolerance: ``max|x_diffusers - x_indis| / max|x_indis| <= 1e-5`` (``TOL``), with diffusers in float32 and
indis in float64 (the reference). diffusers keeps its sigma / timestep tables in float32 and its ``step``
runs in float32 (DPM-Solver++, Euler and FlowMatchEuler even upcast/cast the sample to float32), so its
trajectory carries float32 rounding (unit roundoff 6e-8) accumulated over up to 39 evaluations and
amplified by the solver coefficients; observed differences are 5e-8 .. 2e-6 (6.5e-6 for DPM++ 3M on the
5-step Karras grid, where indis itself in float32 is 5.6e-6 off its float64 result). Any disagreement in a
solver *rule* (order warm-up, lower-order final steps, corrector placement, B(h), grid) shows up at 1e-4 or
more. The one loosened case is Heun at N=3 (``test_euler_heun_discrete``): its first step, 157 -> 3.4,
multiplies the derivative at sigma=3.4 by dt/2 = -77, amplifying float32 rounding ~200x (indis alone in
float32 vs float64: 1.8e-5), so there the bound is 3x that measured float32 sensitivity.

Conventions that matter for parity (read from the diffusers 0.42 sources):

* DPM-Solver++ / UniPC / DDIM keep ``sample`` in VP coordinates and hand the model an integer timestep;
  indis uses ``Denoiser(net, VPDiscrete, ...)``, whose state is the VP ``x`` and which passes the
  fractional timestep ``family.t(sigma)`` (the same integer up to the float32 rounding of diffusers' sigma).
* With ``use_karras_sigmas=True`` diffusers *rounds* the timestep handed to the model while its update uses
  the unrounded Karras sigma, so its model sees another noise level than its solver assumes (a diffusers
  approximation, not a solver property). The karras test hands the network the exact fractional timestep
  of each grid sigma -- the value indis uses -- to compare the solvers themselves. The float32 grid is
  used verbatim (``test_karras_grid_accepted_verbatim``).
* UniPC ``bh1`` with ``final_sigmas_type="zero"`` returns NaN in diffusers: on the last step h = inf, so
  B(h) = -h = -inf, and the order-1 predictor computes ``alpha_t * B_h * pred_res`` with ``pred_res = 0``.
  bh1 is therefore compared on ``final_sigmas_type="sigma_min"`` grids (bh2 on both kinds).
* Euler / Heun (discrete) keep ``sample`` in VE coordinates and interpolate sigma *linearly* at fractional
  timesteps; the diffusers-side network maps t -> sigma with that exact rule (bit-equal to
  ``scheduler.sigmas``) and indis uses the plain VE denoiser ``x0(x_ve, sigma)`` on the distinct sigmas.
  Heun's timestep list repeats interior points (2 evaluations per step, Euler for the last step to 0).
* DDIM (eta=0, ``set_alpha_to_one``, ``clip_sample=False``) is indis ``euler`` on sigma(DDIM timesteps) + [0].
* FlowMatchEuler starts at t = 1 (indis sigma = inf) and passes ``1000 t`` to the model; it has no
  ``scale_model_input``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

import indis
from indis import Denoiser, Flow, VPDiscrete
from indis.engine.testbeds.mixtures import GaussianMixture

diffusers = pytest.importorskip("diffusers")
# diffusers 0.42 + numpy 2: np.array(float32 tensor) warns about the `copy` keyword inside set_timesteps.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

TOL = 1e-5
SHAPE = (3, 2, 4, 4)
STEPS = [3, 5, 8, 20]
BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
F64 = torch.float64


def _mixture(seed: int = 0) -> GaussianMixture:
    """Isotropic 3-component mixture on R^32 with closed-form denoisers in every family's coordinate."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(3, math.prod(SHAPE[1:]), generator=g, dtype=F64)
    return GaussianMixture(means, torch.tensor([0.05, 0.1, 0.2], dtype=F64),
                           log_weights=torch.tensor([0.0, 0.5, -0.3], dtype=F64), shape=SHAPE[1:])


MIX = _mixture()


def _batch(v: Tensor | float | int, b: int) -> Tensor:
    return torch.as_tensor(v).to(F64).reshape(-1).expand(b)


def vp_net(sigma_of_t, prediction: str = "eps"):
    """Discrete-VP network ``net(x_vp, t) -> eps | v | x0``; ``sigma_of_t`` maps its time input to sigma."""

    def net(x: Tensor, t: Tensor) -> Tensor:
        sigma = sigma_of_t(_batch(t, x.shape[0])).view(-1, *[1] * (x.ndim - 1))
        alpha = torch.rsqrt(1 + sigma * sigma)
        s = sigma * alpha
        xd = x.to(F64)
        x0 = MIX.denoise_scaled(xd, alpha, s)
        eps = (xd - alpha * x0) / s
        out = {"eps": eps, "v": alpha * eps - s * x0, "x0": x0}[prediction]
        return out.to(x.dtype)

    return net


def flow_net(x: Tensor, time: Tensor) -> Tensor:
    """Flow-matching velocity ``eps - x0`` for ``x_t = (1 - t) x0 + t eps``, time input ``1000 t``."""
    t = (_batch(time, x.shape[0]) / 1000).view(-1, *[1] * (x.ndim - 1))
    xd = x.to(F64)
    x0 = MIX.denoise_scaled(xd, 1 - t, t)
    return ((xd - x0) / t).to(x.dtype)


def ve_denoiser(x: Tensor, sigma: Tensor) -> Tensor:
    """k-diffusion denoiser ``x0(x_ve, sigma)`` of the same mixture."""
    return MIX(x, _batch(sigma, x.shape[0]))


def diffusers_sigma_of_t(sched):
    """diffusers' Euler/Heun rule, reproduced exactly: sigma linearly interpolated (``np.interp``) in its
    float32 integer-timestep table, then rounded to float32 -- bit-equal to ``sched.sigmas``."""
    table = (((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5).numpy()

    def sigma_of_t(t: Tensor) -> Tensor:
        sig = np.interp(t.numpy(), np.arange(table.size), table).astype(np.float32)
        return torch.from_numpy(sig).to(F64)

    return sigma_of_t


def x_T(seed: int = 1) -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def run_diffusers(sched, net, x: Tensor, model_time=None) -> Tensor:
    """The standard diffusers loop; ``model_time(i, t)`` optionally replaces the time handed to ``net``."""
    scale_input = getattr(sched, "scale_model_input", None)  # FlowMatchEuler has none
    for i, t in enumerate(sched.timesteps):
        tm = t if model_time is None else model_time(i, t)
        out = net(x if scale_input is None else scale_input(x, t), tm)
        x = sched.step(out, t, x).prev_sample
    return x


def rel_diff(x: Tensor, ref: Tensor) -> float:
    """``max|x - ref| / max|ref|`` (both must be finite)."""
    x, ref = x.to(F64), ref.to(F64)
    assert torch.isfinite(x).all() and torch.isfinite(ref).all()
    return float((x - ref).abs().max() / ref.abs().max())


def check(x_diffusers: Tensor, x_indis: Tensor, label: str, tol: float = TOL) -> float:
    err = rel_diff(x_diffusers, x_indis)
    print(f"{label}: max rel diff {err:.2e} (tol {tol:.1e})")
    assert err <= tol, f"{label}: relative difference {err:.3e} > {tol:.1e}"
    return err


def vp_family(**overrides) -> VPDiscrete:
    return VPDiscrete.from_config(**{**BETAS, **overrides})


# ----------------------------------------------------------------------------------------- sanity checks
@pytest.mark.parametrize(("schedule", "kw"), [
    ("linear", {}),
    ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
    ("squaredcos_cap_v2", {}),
])
def test_vp_discrete_table_matches_diffusers(schedule: str, kw: dict) -> None:
    """``VPDiscrete.from_config`` promises diffusers' float32 ``alphas_cumprod`` bit for bit."""
    sched = diffusers.DDIMScheduler(**{**BETAS, "beta_schedule": schedule, **kw})
    fam = vp_family(beta_schedule=schedule, **kw)
    # Whatever the bits, the tables agree to float32 accuracy, which is all the parity tests below need.
    torch.testing.assert_close(fam.alphas_cumprod.float(), sched.alphas_cumprod, rtol=1e-6, atol=0)
    assert torch.equal(fam.alphas_cumprod.float(), sched.alphas_cumprod)


# ------------------------------------------------------------------------------ 1. DPM-Solver++ multistep
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("order", [2, 3])
def test_dpmsolver_multistep(order: int, steps: int) -> None:
    sched = diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++", solver_order=order)
    sched.set_timesteps(steps)
    assert sched.sigmas[-1] == 0
    fam = vp_family()
    x = x_T()
    ref = run_diffusers(sched, vp_net(fam.sigma), x)
    den = Denoiser(vp_net(fam.sigma), fam, "eps", "t")
    ours = indis.sample(den, x.to(F64), sched.sigmas.to(F64), f"dpmpp_{order}m")
    check(ref, ours, f"DPM++ {order}M N={steps}")


@pytest.mark.parametrize(("order", "steps"), [(2, 8), (3, 5), (3, 20)])
def test_dpmsolver_multistep_karras(order: int, steps: int) -> None:
    sched = diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++", solver_order=order,
                                                  use_karras_sigmas=True)
    sched.set_timesteps(steps)
    fam = vp_family()
    grid = sched.sigmas.to(F64)
    exact_t = fam.t(grid[:-1])  # diffusers hands the model round(exact_t); see module docstring
    assert torch.equal(sched.timesteps.to(F64), exact_t.round())
    x = x_T()
    ref = run_diffusers(sched, vp_net(fam.sigma), x, model_time=lambda i, t: exact_t[i])
    den = Denoiser(vp_net(fam.sigma), fam, "eps", "t")
    ours = indis.sample(den, x.to(F64), grid, f"dpmpp_{order}m")
    check(ref, ours, f"DPM++ {order}M karras N={steps}")


def test_karras_grid_accepted_verbatim() -> None:
    """diffusers' own ``scheduler.sigmas`` (float32) is usable as an indis grid as is."""
    sched = diffusers.DPMSolverMultistepScheduler(**BETAS, use_karras_sigmas=True)
    sched.set_timesteps(8)
    fam = vp_family()
    den = Denoiser(vp_net(fam.sigma), fam, "eps", "t")
    out = indis.sample(den, x_T().to(F64), sched.sigmas.to(F64), "dpmpp_2m")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("prediction", "diffusers_name", "schedule"),
                         [("v", "v_prediction", "linear"), ("x0", "sample", "linear"),
                          ("eps", "epsilon", "scaled_linear")])
def test_dpmsolver_multistep_predictions(prediction: str, diffusers_name: str, schedule: str) -> None:
    kw = {"beta_schedule": schedule}
    if schedule == "scaled_linear":
        kw |= {"beta_start": 0.00085, "beta_end": 0.012}
    sched = diffusers.DPMSolverMultistepScheduler(**{**BETAS, **kw}, algorithm_type="dpmsolver++",
                                                  solver_order=2, prediction_type=diffusers_name)
    sched.set_timesteps(8)
    fam = vp_family(**kw)
    x = x_T()
    ref = run_diffusers(sched, vp_net(fam.sigma, prediction), x)
    den = Denoiser(vp_net(fam.sigma, prediction), fam, prediction, "t")
    ours = indis.sample(den, x.to(F64), sched.sigmas.to(F64), "dpmpp_2m")
    check(ref, ours, f"DPM++ 2M {prediction} {schedule} N=8")


# ------------------------------------------------------------------------------------------------ 2. UniPC
def unipc_parity(variant: str, order: int, steps: int, final: str, prediction: str = "eps",
                 disable_corrector: tuple[int, ...] = ()) -> tuple[Tensor, Tensor, float]:
    names = {"eps": "epsilon", "v": "v_prediction"}
    sched = diffusers.UniPCMultistepScheduler(**BETAS, solver_type=variant, solver_order=order,
                                              predict_x0=True, final_sigmas_type=final,
                                              prediction_type=names[prediction],
                                              disable_corrector=list(disable_corrector))
    sched.set_timesteps(steps)
    assert (sched.sigmas[-1] == 0) == (final == "zero")
    fam = vp_family()
    x = x_T()
    ref = run_diffusers(sched, vp_net(fam.sigma, prediction), x)
    den = Denoiser(vp_net(fam.sigma, prediction), fam, prediction, "t")
    ours = indis.sample(den, x.to(F64), sched.sigmas.to(F64), "unipc", variant=variant, order=order,
                        disable_corrector=list(disable_corrector))
    label = (f"UniPC {variant} order {order} N={steps} final={final} {prediction} "
             f"disable={list(disable_corrector)}")
    return ref, ours, check(ref, ours, label)


# bh1 runs with final_sigmas_type="sigma_min": diffusers' bh1 returns NaN on a final sigma of 0 (module doc).
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize(("variant", "final"), [("bh1", "sigma_min"), ("bh2", "zero")])
def test_unipc(variant: str, final: str, order: int, steps: int) -> None:
    unipc_parity(variant, order, steps, final)


@pytest.mark.parametrize("steps", [3, 8])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_bh2_sigma_min(order: int, steps: int) -> None:
    unipc_parity("bh2", order, steps, "sigma_min")


@pytest.mark.parametrize(("variant", "final", "order", "steps"),
                         [("bh1", "sigma_min", 2, 5), ("bh2", "zero", 3, 8), ("bh2", "zero", 2, 20)])
def test_unipc_disable_corrector(variant: str, final: str, order: int, steps: int) -> None:
    _, ours, err = unipc_parity(variant, order, steps, final, disable_corrector=(0, 1))
    # The option really changes the result (guards against it being ignored on both sides).
    fam = vp_family()
    sched = diffusers.UniPCMultistepScheduler(**BETAS, final_sigmas_type=final)
    sched.set_timesteps(steps)
    den = Denoiser(vp_net(fam.sigma), fam, "eps", "t")
    full = indis.sample(den, x_T().to(F64), sched.sigmas.to(F64), "unipc", variant=variant, order=order)
    assert rel_diff(full, ours) > 10 * max(err, 1e-7)


@pytest.mark.parametrize(("variant", "final", "order"), [("bh1", "sigma_min", 2), ("bh2", "zero", 3)])
def test_unipc_v_prediction(variant: str, final: str, order: int) -> None:
    unipc_parity(variant, order, 8, final, prediction="v")


# -------------------------------------------------------------------------------------- 3. Euler and Heun
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_euler_heun_discrete(name: str, steps: int) -> None:
    cls = {"euler": diffusers.EulerDiscreteScheduler, "heun": diffusers.HeunDiscreteScheduler}[name]
    sched = cls(**BETAS)
    sched.set_timesteps(steps)
    sigma_of_t = diffusers_sigma_of_t(sched)
    # Heun repeats interior grid points (two evaluations per step); the indis grid is the distinct sigmas.
    grid = torch.unique_consecutive(sched.sigmas).to(F64)
    assert grid.numel() == steps + 1 and grid[-1] == 0
    assert torch.equal(sigma_of_t(torch.unique_consecutive(sched.timesteps).to(F64)), grid[:-1])
    x = x_T() * sched.init_noise_sigma  # VE state, sigma_max * eps
    ref = run_diffusers(sched, vp_net(sigma_of_t), x)
    nfe = []
    ours = indis.sample(ve_denoiser, x.to(F64), grid, name, callback=nfe.append)
    assert len(nfe) == len(sched.timesteps)
    # Float32 sensitivity of the problem itself: indis in float32 vs float64 on the same grid. Only Heun at
    # N=3 exceeds TOL/3 (its first step 157 -> 3.4 multiplies the derivative at sigma=3.4 by dt/2 = -77, so
    # float32 rounding grows ~200x: 1.8e-5 for indis alone); there the tolerance is 3x that measured value.
    own_f32 = rel_diff(indis.sample(ve_denoiser, x, grid.float(), name), ours)
    check(ref, ours, f"{name} discrete N={steps}", tol=max(TOL, 3 * own_f32))


# --------------------------------------------------------------------------------------------------- 4. DDIM
@pytest.mark.parametrize("steps", STEPS)
def test_ddim(steps: int) -> None:
    sched = diffusers.DDIMScheduler(**BETAS, set_alpha_to_one=True, clip_sample=False)
    sched.set_timesteps(steps)
    fam = vp_family()
    # DDIM's grid: its timesteps, then the final alpha_cumprod = 1 (set_alpha_to_one), i.e. sigma = 0.
    grid = torch.cat([fam.sigma(sched.timesteps.to(F64)), torch.zeros(1, dtype=F64)])
    x = x_T()
    ref = run_diffusers(sched, vp_net(fam.sigma), x)
    den = Denoiser(vp_net(fam.sigma), fam, "eps", "t")
    ours = indis.sample(den, x.to(F64), grid, "euler")
    check(ref, ours, f"DDIM N={steps}")


# ---------------------------------------------------------------------------------- 5. flow-matching Euler
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_euler(shift: float, steps: int) -> None:
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    assert sched.sigmas[0] == 1.0 and sched.sigmas[-1] == 0.0
    grid = indis.as_grid(timesteps=sched.sigmas.to(F64), family="flow")
    assert math.isinf(grid[0, 0])
    x = x_T()  # x_1 = eps in the flow's own coordinate
    ref = run_diffusers(sched, flow_net, x)
    den = Denoiser(flow_net, Flow(), "velocity", "t", time_scale=1000)
    ours = indis.sample(den, x.to(F64), grid, "euler")
    check(ref, ours, f"FlowMatchEuler shift={shift} N={steps}")
