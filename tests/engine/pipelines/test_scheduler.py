"""``indis.IndisScheduler``: indis' solvers on one shared grid inside an unchanged diffusers pipeline."""

from __future__ import annotations

import pytest
import torch

import indis
from indis.engine.testbeds.tiny_diffusers import TEXT, tiny_sd_pipe

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
PROMPTS = ["a photo of a cat", "a red dog"]
BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _latents(pipe, steps: int) -> torch.Tensor:
    return pipe(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                guidance_scale=7.5, output_type="latent").images


@pytest.mark.parametrize(("cls", "solver"), [("DPMSolverMultistepScheduler", "dpmpp_2m"),
                                             ("UniPCMultistepScheduler", "unipc")])
def test_on_a_schedulers_own_grid_the_pipeline_gives_its_own_result(cls: str, solver: str) -> None:
    pipe = tiny_sd_pipe(getattr(diffusers, cls)(**BETAS))
    ref = _latents(pipe, 6)
    grid = indis.grid_from_scheduler(pipe.scheduler, 6)
    pipe.scheduler = indis.IndisScheduler.from_config(pipe.scheduler.config, sigmas=grid.tolist(),
                                                      solver=solver, init_noise_sigma=1.0)
    ours = _latents(pipe, 6)
    assert _rel(ours, ref) <= 1e-5, _rel(ours, ref)
    assert pipe.scheduler.timesteps.numel() == 6


def test_an_indis_mean_schedule_with_shift_and_scale_equals_indis_sample(tmp_path) -> None:
    """A shared grid with INDIS's per-step time shift and noise scale (a VP model: the network input is
    rescaled at the shifted point) runs in the pipe's loop as in indis.sample; the config round-trips."""
    pipe = tiny_sd_pipe()
    grid = indis.get_sigmas("logsnr", 4, 0.05, 14.0)
    shift, scale = [0.05, -0.03, 0.02, 0.0], [1.01, 0.99, 1.0, 1.02]
    pipe.scheduler = indis.IndisScheduler.from_config(pipe.scheduler.config, sigmas=grid.tolist(),
                                                      shift=shift, scale=scale, solver="ipndm")
    ours = _latents(pipe, 4)
    den = indis.from_diffusers(pipe.unet, diffusers.DPMSolverMultistepScheduler(**BETAS))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True, None)
    with torch.no_grad():
        schedule = indis.Schedule(grid, torch.tensor(shift), torch.tensor(scale))
        ref = indis.sample(den, noise * float(den.family.s(grid[:1])), schedule, "ipndm", cond={TEXT: embeds},
                           uncond={TEXT: negative}, guidance_scale=7.5)
    assert _rel(ours, ref) <= 1e-5, _rel(ours, ref)
    pipe.scheduler.save_config(tmp_path)
    again = indis.IndisScheduler.from_pretrained(tmp_path)
    again.set_timesteps(4)
    torch.testing.assert_close(again.timesteps, pipe.scheduler.timesteps)


def test_misuse_is_refused() -> None:
    config = diffusers.DPMSolverMultistepScheduler(**BETAS).config
    sched = indis.IndisScheduler.from_config(config, sigmas=[14.0, 3.0, 0.5, 0.0])
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(torch.zeros(1, 4), 0, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="num_inference_steps=3"):
        sched.set_timesteps(5)
    sched.set_timesteps(3)
    x = torch.zeros(1, 4)
    for t in sched.timesteps:
        x = sched.step(torch.zeros(1, 4), t, sched.scale_model_input(x, t)).prev_sample
    with pytest.raises(RuntimeError, match="all 3 stages"):
        sched.step(torch.zeros(1, 4), 0, x)
    for kw, match in [({"solver": "ddpm"}, "unknown"), ({"shift": [0.1]}, "pass sigmas"),
                      ({"schedule": "nope"}, "heuristic")]:
        with pytest.raises(ValueError, match=match):
            indis.IndisScheduler.from_config(config, **kw)
    heuristic = indis.IndisScheduler.from_config(config, schedule="edm")
    heuristic.set_timesteps(7)
    assert heuristic.timesteps.numel() == 7


def test_sd3_with_the_shim_on_its_flow_grid_and_what_flow_refuses(tmp_path) -> None:
    """SD3 (FlowMatch, shift 3) with the shim on the FlowMatch scheduler's own grid gives the pipe's own
    latents; a tensor grid saves as a list; a flow model without a grid, or with a shift, is refused."""
    from indis.engine.testbeds.tiny_diffusers import tiny_sd3_pipe

    pipe = tiny_sd3_pipe()
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=5, guidance_scale=7.0, output_type="latent", max_sequence_length=8)
    ref = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **call).images
    grid = indis.grid_from_scheduler(pipe.scheduler, 5)
    config = pipe.scheduler.config
    pipe.scheduler = indis.IndisScheduler.from_config(config, sigmas=grid, solver="euler")
    ours = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **call).images
    assert _rel(ours, ref) <= 1e-5, _rel(ours, ref)
    pipe.scheduler.save_config(tmp_path)
    assert indis.IndisScheduler.from_pretrained(tmp_path).config.sigmas[1:] == grid[1:].tolist()
    for kw in ({}, {"sigmas": grid, "shift": [0.1] * 5}):
        with pytest.raises(ValueError, match="explicit grid"):
            indis.IndisScheduler.from_config(config, **kw)
