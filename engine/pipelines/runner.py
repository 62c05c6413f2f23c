"""A diffusers Stable Diffusion pipeline run by indis: the pipe's own prompt encoder and VAE around indis'
sampler, with per-sample schedules (an INDIS predictor), classifier-free guidance, a progress bar,
``callback_on_step_end`` and CUDA graphs on GPU.

:func:`diffusers_pipeline` takes pipelines shaped like ``StableDiffusionPipeline`` (a ``unet``, a ``vae``,
``encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt, ...)``
returning the prompt's and the negative prompt's embeddings); pipelines with other encoders (SDXL's two text
encoders and ``added_cond_kwargs``, SD3 / FLUX transformers) are refused with what to use instead:
``indis.from_diffusers`` with the embeddings they produce, or :class:`~indis.engine.pipelines.scheduler.
IndisScheduler` inside the pipe itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from indis.engine.core.external import from_diffusers, grid_from_scheduler
from indis.engine.core.families import Denoiser
from indis.engine.core.graphs import GraphSampler
from indis.engine.core.guidance import guided
from indis.engine.core.predictor import Predictor
from indis.engine.core.sampling import prepare, run
from indis.engine.core.schedules import HEURISTICS, Schedule, as_grid, get_sigmas
from indis.engine.tuning.fit import fit_gits
from indis.engine.tuning.teacher import noise_from_seeds

TEXT = "encoder_hidden_states"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _check_pipe(pipe: Any) -> None:
    needed = ("unet", "vae", "encode_prompt", "scheduler", "image_processor")
    missing = [a for a in needed if not hasattr(pipe, a)]
    if missing or hasattr(pipe, "text_encoder_2"):
        why = f"it has no {missing}" if missing else "it has a second text encoder (SDXL-style)"
        raise NotImplementedError(
            f"diffusers_pipeline runs StableDiffusionPipeline-shaped pipes; {type(pipe).__name__} is not "
            f"({why}). Use indis.from_diffusers(model, scheduler) with indis.sample(..., cond=, uncond=, "
            "guidance_scale=) on the embeddings the pipe's encoders produce, or keep the pipe and set "
            "pipe.scheduler = IndisScheduler.from_config(pipe.scheduler.config, sigmas=...)")


def _initial_noise(batch: int, shape: tuple[int, ...], seeds: Sequence[int] | None,
                   generator: torch.Generator | list | None, latents: Tensor | None,
                   device: torch.device) -> Tensor:
    """Standard-normal noise per sample: ``latents`` as given, one seed per sample (``noise_from_seeds``:
    each sample's noise independent of the batch), or the pipe's own draw from ``generator``."""
    given = sum(v is not None for v in (seeds, generator, latents))
    if given > 1:
        raise ValueError("give at most one of seeds, generator and latents")
    if latents is not None:
        if tuple(latents.shape) != (batch, *shape):
            raise ValueError(f"latents must have shape {(batch, *shape)}, got {tuple(latents.shape)}")
        return latents.to(device, torch.float32)
    if seeds is not None:
        if len(seeds) != batch:
            raise ValueError(f"seeds has {len(seeds)} entries for {batch} images")
        return noise_from_seeds(seeds, shape, device=device)
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor((batch, *shape), generator=generator, device=device, dtype=torch.float32)


def _schedule(schedule: Any, den: Denoiser, pipe: Any, nfe: int | None, noise: Tensor, cond: dict,
              phi_cond: Tensor | None, gits_model: Denoiser) -> tuple[Tensor | Schedule, Tensor]:
    """The schedule and the start state: the pipe's scheduler grid (started as diffusers starts: the noise
    times ``init_noise_sigma``, moved into the model's coordinate), a heuristic, GITS, a grid / Schedule,
    or an INDIS predictor's per-sample schedule (started at ``s(sigma_max)`` times the noise, as in
    tuning)."""
    fam = den.family
    if isinstance(schedule, Predictor):
        sc = schedule.config.schedule
        if nfe is not None and nfe != sc.nfe:
            raise ValueError(f"the predictor was tuned for NFE {sc.nfe}, not nfe={nfe}")
        x = noise * float(fam.s(torch.tensor(sc.sigma_max, dtype=torch.float64)))
        if schedule.config.cond_dim and phi_cond is None:
            raise ValueError("this predictor reads a condition: pass phi_cond (e.g. the pooled prompt "
                             "embedding it was tuned on)")
        with torch.no_grad():
            return schedule(x, phi_cond), x
    if nfe is None:
        raise ValueError("nfe is required unless the schedule is an INDIS predictor")
    if isinstance(schedule, str) and schedule == "scheduler":
        grid = grid_from_scheduler(pipe.scheduler, nfe).to(noise.device)
        start = noise * float(pipe.scheduler.init_noise_sigma)
        if float(pipe.scheduler.init_noise_sigma) != 1.0:  # a VE-coordinate scheduler (Euler, Heun, ...)
            start = start * float(fam.alpha(grid[:1].cpu()))
        return grid, start
    lo, hi = fam.sigma_range
    if isinstance(schedule, str) and schedule in HEURISTICS:
        grid = get_sigmas(schedule, nfe, lo, hi, family=fam, device=noise.device)
    elif isinstance(schedule, str) and schedule == "gits":
        x = noise * float(fam.s(torch.tensor(hi, dtype=torch.float64)))
        grid = fit_gits(gits_model, x, nfe=nfe, sigma_min=lo, sigma_max=hi, cond=cond)
    elif isinstance(schedule, (Tensor, Schedule)):
        grid = schedule
    else:
        raise ValueError(f"schedule={schedule!r}: use 'scheduler', 'gits', a heuristic {HEURISTICS}, a grid "
                         "[N+1] / [B, N+1], a Schedule or an INDIS Predictor")
    first = (grid.grid if isinstance(grid, Schedule) else torch.as_tensor(grid)).to(torch.float64)
    first = first[..., 0].reshape(-1, *([1] * (noise.ndim - 1))).cpu()
    return grid, noise * fam.s(first).to(noise.device, noise.dtype)


@torch.no_grad()
def diffusers_pipeline(pipe: Any, prompt: str | list[str] | None = None, *, nfe: int | None = None,
                       schedule: Any = "scheduler", solver: str = "dpmpp_2m",
                       negative_prompt: str | list[str] | None = None, prompt_embeds: Tensor | None = None,
                       negative_prompt_embeds: Tensor | None = None, guidance_scale: float | Tensor = 7.5,
                       guidance_rescale: float = 0.0, num_images_per_prompt: int = 1,
                       height: int | None = None, width: int | None = None,
                       seeds: Sequence[int] | None = None, generator: torch.Generator | list | None = None,
                       latents: Tensor | None = None,
                       phi_cond: Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                       callback_on_step_end: Callable[..., dict] | None = None,
                       callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                       progress: bool | None = True, graphs: bool | None = None,
                       timestep_rounding: str | None = None, **solver_opts) -> Any:
    """Generate images with ``pipe`` (a ``StableDiffusionPipeline``-shaped diffusers pipeline; see the
    module docstring) sampled by indis.

    ``schedule``: ``"scheduler"`` (the pipe's scheduler's own grid for ``nfe`` steps: with the same solver
    and ``generator``, the pipe's own images to float rounding), ``"gits"`` (GITS on this batch: 60 extra
    network evaluations), a heuristic name, a grid ``[N+1]`` or ``[B, N+1]``, a :class:`Schedule`, or an
    INDIS :class:`~indis.engine.core.predictor.Predictor` (per-sample schedules from each image's noise and
    ``phi_cond`` -- e.g. the pooled prompt embedding it was tuned on; ``nfe`` is the predictor's). Noise:
    ``seeds`` (one per image, reproducible per image), ``generator`` (the pipe's draw) or ``latents``.
    ``guidance_scale``: a float or one per image (``[B]``); guidance is off at 1 or below, as in diffusers.
    ``callback_on_step_end(pipe, i, t, kwargs) -> dict`` is called after every grid step ``i`` with the
    per-image network times ``t`` and ``kwargs`` holding ``callback_on_step_end_tensor_inputs``
    (``latents``, in the model's coordinate, ``prompt_embeds``, ``negative_prompt_embeds``); a returned
    ``"latents"`` replaces the state, the same on every backend. ``progress``: a progress bar over the
    network evaluations. ``graphs``: one CUDA graph per call (default on CUDA without a callback).
    Returns the pipe's output type (``images``; ``output_type``: pil, np, pt or latent), or a tuple with
    ``return_dict=False``.
    """
    _check_pipe(pipe)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r}: choose one of {OUTPUT_TYPES}")
    unknown = set(callback_on_step_end_tensor_inputs) - {"latents", "prompt_embeds", "negative_prompt_embeds"}
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not available; choose "
                         "from latents, prompt_embeds, negative_prompt_embeds")
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    do_cfg = isinstance(guidance_scale, Tensor) or float(guidance_scale) > 1.0
    embeds, negative = pipe.encode_prompt(prompt, device, num_images_per_prompt, do_cfg, negative_prompt,
                                          prompt_embeds=prompt_embeds,
                                          negative_prompt_embeds=negative_prompt_embeds)
    batch = embeds.shape[0]
    scaling = pipe.vae_scale_factor
    height = height or unet.config.sample_size * scaling
    width = width or unet.config.sample_size * scaling
    if height % scaling or width % scaling:
        raise ValueError(f"height and width must be multiples of the VAE's factor {scaling}")
    shape = (unet.config.in_channels, height // scaling, width // scaling)
    noise = _initial_noise(batch, shape, seeds, generator, latents, device)
    den = from_diffusers(unet, pipe.scheduler, timestep_rounding=timestep_rounding)
    cond = {TEXT: embeds}
    model = den
    if do_cfg:
        model = guided(den, {TEXT: negative}, guidance_scale, guidance_rescale=guidance_rescale)

    sched, x = _schedule(schedule, den, pipe, nfe, noise, cond, phi_cond, model)
    x = x.to(dtype)
    grid = as_grid(sched.grid if isinstance(sched, Schedule) else sched, batch_size=batch, device=device)

    def step_end(i: int, y: Tensor) -> Tensor | None:
        t = den.time(grid[:, i].to(torch.float64))
        local = {"latents": y, "prompt_embeds": embeds, "negative_prompt_embeds": negative}
        out = callback_on_step_end(pipe, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
        return None if not out else out.get("latents")

    use_graphs = (x.is_cuda and callback_on_step_end is None) if graphs is None else graphs
    if use_graphs:
        if callback_on_step_end is not None:
            raise ValueError("graphs=True replays one captured call: callback_on_step_end needs graphs=False")
        sampler = GraphSampler(den, solver, guidance_rescale=guidance_rescale, **solver_opts)
        extra = {"uncond": {TEXT: negative}, "guidance_scale": guidance_scale} if do_cfg else {}
        out = sampler(x, sched, cond=cond, **extra)
    else:
        plan = prepare(model, x, sched, solver, **solver_opts)
        out = run(plan, x, cond, progress=progress,
                  step_end=step_end if callback_on_step_end is not None else None)
    if output_type == "latent":
        images = out
    else:
        scaled = out.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
        decoded = pipe.vae.decode(scaled, return_dict=False)[0]
        images = pipe.image_processor.postprocess(decoded, output_type=output_type,
                                                  do_denormalize=[True] * batch)
    if not return_dict:
        return images, None
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)


__all__ = ["diffusers_pipeline"]
