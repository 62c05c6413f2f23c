"""``indis.diffusers_pipeline``: a tiny Stable Diffusion pipeline (CLIP encoder, UNet, VAE, built offline)
run by indis, against the pipe's own call."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import indis
from indis.engine.testbeds.tiny_diffusers import SD_BETAS, TEXT, tiny_sd3_pipe, tiny_sd_pipe, tiny_sdxl_pipe

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
PROMPTS = ["a photo of a cat", "a red dog"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_the_schedulers_grid_gives_the_pipes_own_result() -> None:
    """Same scheduler grid, solver, noise (the pipe's generator) and CFG 7.5 with a negative prompt: the
    latents and the decoded images equal the pipe's own call."""
    pipe = tiny_sd_pipe()
    kw = dict(negative_prompt=["blurry", "blurry"], guidance_scale=7.5)
    ref = pipe(PROMPTS, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
               output_type="latent", **kw).images
    ours = indis.diffusers_pipeline(pipe, PROMPTS, nfe=6, generator=torch.Generator().manual_seed(0),
                                    output_type="latent", progress=False, **kw).images
    assert _rel(ours, ref) <= 1e-5, _rel(ours, ref)
    img_ref = pipe(PROMPTS, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                   output_type="np", **kw).images
    img = indis.diffusers_pipeline(pipe, PROMPTS, nfe=6, generator=torch.Generator().manual_seed(0),
                                   output_type="np", progress=False, **kw).images
    assert img.shape == img_ref.shape == (2, 16, 16, 3) and abs(img - img_ref).max() <= 1e-4


@pytest.mark.parametrize(("build", "encode"),
                         [(tiny_sdxl_pipe, {}), (tiny_sd3_pipe, {"max_sequence_length": 8})],
                         ids=["sdxl-euler", "sd3-flow-match"])
def test_sdxl_and_sd3_pipelines_give_their_own_result(build, encode: dict) -> None:
    """SDXL (two text encoders, pooled embedding and size ids; Euler, whose latents are VE-scaled) and SD3
    (an MMDiT under FlowMatch with shift 3, pooled projections): on the scheduler's own grid with Euler and
    CFG 7 with a negative prompt, the latents and images equal the pipe's own call."""
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    kw = dict(negative_prompt=["blurry", "blurry"], guidance_scale=7.0)
    for output_type in ("latent", "np"):
        ref = pipe(PROMPTS, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                   output_type=output_type, **kw, **encode).images
        ours = indis.diffusers_pipeline(pipe, PROMPTS, nfe=6, solver="euler", output_type=output_type,
                                        generator=torch.Generator().manual_seed(0), encode_kwargs=encode,
                                        progress=False, **kw).images
        if output_type == "latent":
            assert _rel(ours, ref) <= 1e-5, _rel(ours, ref)
        else:
            assert ours.shape == ref.shape == (2, 16, 16, 3) and abs(ours - ref).max() <= 1e-4
    with pytest.raises(ValueError, match="finite sigma range") if build is tiny_sd3_pipe else nullcontext():
        indis.diffusers_pipeline(pipe, PROMPTS, nfe=3, schedule="edm", seeds=[0, 1], encode_kwargs=encode,
                                 output_type="latent", progress=False)


def test_per_image_schedules_from_a_text_conditioned_predictor_and_per_image_guidance() -> None:
    """phi reads each image's noise and pooled prompt embedding: each image equals itself sampled alone
    (seeds are per image), and equals indis.sample with the same schedule and guidance."""
    pipe = tiny_sd_pipe()
    sc = indis.ScheduleConfig(nfe=4, sigma_min=0.05, sigma_max=14.0, family="vp_linear")
    phi = indis.Predictor(indis.PredictorConfig(sc, "dpmpp_2m", (4, 8, 8), cond_dim=12, pool=2))
    torch.nn.init.normal_(phi.out.weight, std=0.05)
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True, None)
    scales = torch.tensor([3.0, 7.5])
    out = indis.diffusers_pipeline(pipe, PROMPTS, schedule=phi, seeds=[4, 9], phi_cond=embeds.mean(1),
                                   guidance_scale=scales, output_type="latent", progress=False).images
    den = indis.from_diffusers(pipe.unet, pipe.scheduler)
    x = indis.noise_from_seeds([4, 9], (4, 8, 8)) * float(den.family.s(torch.tensor(14.0)))
    with torch.no_grad():
        ref = indis.sample(den, x, phi(x, embeds.mean(1)), "dpmpp_2m", cond={TEXT: embeds},
                           uncond={TEXT: negative}, guidance_scale=scales)
        assert _rel(out, ref) <= 1e-5
        alone = indis.diffusers_pipeline(pipe, PROMPTS[1], schedule=phi, seeds=[9],
                                         phi_cond=embeds[1:].mean(1), guidance_scale=7.5,
                                         output_type="latent", progress=False).images
    assert _rel(out[1:], alone) <= 1e-5
    grids = phi(x, embeds.mean(1)).grid
    assert not torch.equal(grids[0], grids[1])  # per-image schedules


def test_callback_on_step_end_sees_every_step_and_may_edit_the_latents(capsys) -> None:
    pipe = tiny_sd_pipe()
    seen = []

    def callback(p, i, t, kwargs):
        assert p is pipe and t.shape == (2,) and set(kwargs) == {"latents", "prompt_embeds"}
        seen.append((i, kwargs["latents"].clone()))
        return {"latents": kwargs["latents"] * 0.5} if i == 2 else {}

    common = dict(nfe=5, seeds=[0, 1], output_type="latent")
    edited = indis.diffusers_pipeline(pipe, PROMPTS, callback_on_step_end=callback,
                                      callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
                                      **common).images
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert "indis" in capsys.readouterr().err  # the progress bar
    recorded = []

    def record(p, i, t, kwargs) -> None:
        recorded.append(kwargs["latents"])

    plain = indis.diffusers_pipeline(pipe, PROMPTS, progress=False, callback_on_step_end=record,
                                     **common).images
    assert _rel(edited, plain) > 1e-3
    for i in range(5):  # the same states up to the edit at the end of step 2, apart after it
        if i <= 2:
            torch.testing.assert_close(seen[i][1], recorded[i])
        else:
            assert _rel(seen[i][1], recorded[i]) > 1e-3


def test_bad_use_is_refused_with_what_to_do() -> None:
    pipe = tiny_sd_pipe()
    sc = indis.ScheduleConfig(nfe=3, sigma_min=0.05, sigma_max=14.0, family="vp_linear")
    phi = indis.Predictor(indis.PredictorConfig(sc, "dpmpp_2m", (4, 8, 8), cond_dim=12))
    for kw, error, match in [
        (dict(nfe=3, output_type="gif"), ValueError, "output_type"),
        (dict(nfe=3, seeds=[1]), ValueError, "1 entries for 2 images"),
        (dict(nfe=3, seeds=[1, 2], generator=torch.Generator()), ValueError, "at most one"),
        (dict(schedule=phi), ValueError, "phi_cond"),
        (dict(schedule=phi, nfe=5, phi_cond=torch.zeros(2, 12)), ValueError, "NFE 3"),
        (dict(schedule="nonsense", nfe=3), ValueError, "schedule="),
        (dict(nfe=3, callback_on_step_end_tensor_inputs=["noise_pred"]), ValueError, "not available"),
    ]:
        with pytest.raises(error, match=match):
            indis.diffusers_pipeline(pipe, PROMPTS, progress=False, **kw)

    class FluxLike:  # packed latents and distilled guidance: not one of the adapted pipelines
        transformer = vae = scheduler = image_processor = None

        def encode_prompt(self, *a, **k):
            raise AssertionError("not reached")

    with pytest.raises(NotImplementedError, match="IndisScheduler"):
        indis.diffusers_pipeline(FluxLike(), "a cat", nfe=3)


@pytest.mark.parametrize("schedule", ["gits", "logsnr"])
def test_gits_and_heuristic_schedules_equal_indis_sample_on_those_grids(schedule: str) -> None:
    pipe = tiny_sd_pipe()
    out = indis.diffusers_pipeline(pipe, PROMPTS, schedule=schedule, nfe=3, seeds=[1, 2], guidance_scale=5.0,
                                   output_type="latent", progress=False).images
    den = indis.from_diffusers(pipe.unet, pipe.scheduler)
    lo, hi = den.family.sigma_range
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True, None)
    model = indis.guided(den, {TEXT: negative}, 5.0)
    x = indis.noise_from_seeds([1, 2], (4, 8, 8)) * float(den.family.s(torch.tensor(hi, dtype=torch.float64)))
    with torch.no_grad():
        grid = (indis.fit_gits(model, x, nfe=3, sigma_min=lo, sigma_max=hi, cond={TEXT: embeds})
                if schedule == "gits" else indis.get_sigmas(schedule, 3, lo, hi, family=den.family))
        ref = indis.sample(model, x, grid, "dpmpp_2m", cond={TEXT: embeds})
    assert _rel(out, ref) <= 1e-5


def test_interrupts_pipe_properties_and_what_diffusers_callbacks_need() -> None:
    """``pipe._interrupt`` set in a callback stops after that step (its latents are the result); the
    callback can read ``pipe.num_timesteps`` and ``pipe.guidance_scale``; PipelineCallback objects (which edit
    embeddings) and diffusers' own call arguments are refused up front."""
    from diffusers.callbacks import SDCFGCutoffCallback

    pipe = tiny_sd_pipe()
    common = dict(nfe=5, seeds=[0, 1], output_type="latent", progress=False)
    recorded, calls = [], []

    def record(p, i, t, kwargs):
        recorded.append(kwargs["latents"])
        assert p.num_timesteps == 5 and p.guidance_scale == 7.5

    indis.diffusers_pipeline(pipe, PROMPTS, callback_on_step_end=record, **common)

    def stop_after_step_1(p, i, t, kwargs):
        calls.append(i)
        p._interrupt = i == 1
        return {}

    out = indis.diffusers_pipeline(pipe, PROMPTS, callback_on_step_end=stop_after_step_1, **common).images
    assert calls == [0, 1] and torch.equal(out, recorded[1])
    with pytest.raises(NotImplementedError, match="PipelineCallback"):
        cutoff = SDCFGCutoffCallback(cutoff_step_ratio=0.5)
        indis.diffusers_pipeline(pipe, PROMPTS, callback_on_step_end=cutoff, **common)
    with pytest.raises(ValueError, match="num_inference_steps is nfe"):
        indis.diffusers_pipeline(pipe, PROMPTS, num_inference_steps=5, **common)


def test_karras_rounding_is_inferred_and_grids_and_graphs_are_handled() -> None:
    """DPM-Solver++ with Karras sigmas feeds rounded timesteps: the runner rounds likewise by default; a grid
    given as a list works, a mismatching nfe is refused; graphs=True reuses one sampler per pipe."""
    from indis.engine.pipelines.runner import _SAMPLERS, infer_rounding

    pipe = tiny_sd_pipe(diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, **SD_BETAS))
    assert infer_rounding(pipe.scheduler, 6) == "round"
    ref = pipe(PROMPTS, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
               output_type="latent").images
    ours = indis.diffusers_pipeline(pipe, PROMPTS, nfe=6, generator=torch.Generator().manual_seed(0),
                                    output_type="latent", progress=False).images
    assert _rel(ours, ref) <= 1e-5, _rel(ours, ref)
    grid = indis.grid_from_scheduler(pipe.scheduler, 4).tolist()
    common = dict(seeds=[0, 1], output_type="latent", progress=False)
    eager = indis.diffusers_pipeline(pipe, PROMPTS, schedule=grid, **common).images
    with pytest.raises(ValueError, match="has 4 steps"):
        indis.diffusers_pipeline(pipe, PROMPTS, schedule=grid, nfe=6, **common)
    for _ in range(2):
        graphed = indis.diffusers_pipeline(pipe, PROMPTS, schedule=grid, graphs=True, **common).images
        assert _rel(graphed, eager) <= 1e-5
    assert len(_SAMPLERS[pipe]) == 1


def test_a_pipe_with_the_scheduler_shim_runs_its_grid() -> None:
    """With ``IndisScheduler`` as the pipe's scheduler, from_diffusers still reads the model's family (not
    flow matching) and schedule='scheduler' runs the shim's grid, shift and scale as the pipe does."""
    pipe = tiny_sd_pipe()
    grid = indis.get_sigmas("logsnr", 4, 0.05, 14.0)
    pipe.scheduler = indis.IndisScheduler.from_config(pipe.scheduler.config, sigmas=grid, shift=[0.05] * 4,
                                                      scale=[1.01] * 4, solver="ipndm")
    assert isinstance(indis.from_diffusers(pipe.unet, pipe.scheduler).family, indis.VPDiscrete)
    ref = pipe(PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
               output_type="latent").images
    ours = indis.diffusers_pipeline(pipe, PROMPTS, nfe=4, solver="ipndm", output_type="latent",
                                    generator=torch.Generator().manual_seed(0), progress=False).images
    assert _rel(ours, ref) <= 1e-5, _rel(ours, ref)
