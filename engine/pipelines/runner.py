"""diffusers pipelines run by indis: the pipe's own prompt encoders and VAE around indis' sampler, with
per-sample schedules (an INDIS predictor), classifier-free guidance, a progress bar, ``callback_on_step_end``
and CUDA graphs on GPU.

:func:`diffusers_pipeline` runs Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``: text embeddings),
SDXL (``StableDiffusionXLPipeline``: two text encoders, pooled embeddings and size ids as
``added_cond_kwargs``) and SD3 (``StableDiffusion3Pipeline``: an MMDiT transformer under flow matching,
pooled projections) pipelines, each through an adapter that gives indis the pipe's network, its conditional
and unconditional inputs, the latent shape and the decoding. Other pipelines (FLUX: packed latents and
distilled guidance; img2img, inpainting) are refused with what to use instead: ``indis.from_diffusers`` with
the inputs they produce, or :class:`~indis.engine.pipelines.scheduler.IndisScheduler` inside the pipe.
"""

from __future__ import annotations

import copy
import json
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from indis.engine.core.external import from_diffusers, grid_from_scheduler, scheduler_config
from indis.engine.core.families import Denoiser
from indis.engine.core.graphs import GraphSampler
from indis.engine.core.guidance import guided
from indis.engine.core.predictor import Predictor
from indis.engine.core.sampling import check_solver, prepare, run
from indis.engine.core.schedules import HEURISTICS, Schedule, as_grid, get_sigmas
from indis.engine.tuning.fit import fit_gits
from indis.engine.tuning.teacher import noise_from_seeds

TEXT = "encoder_hidden_states"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class Prepared:
    """What a pipeline adapter gives indis: the pipe's network, its conditional and unconditional inputs
    (``uncond`` None without guidance), the latent shape, ``decode(latents) -> images`` in the pipe's output
    format and the pipe's output class."""

    network: nn.Module
    cond: dict
    uncond: dict | None
    shape: tuple[int, ...]
    decode: Callable[[Tensor, str], Any]
    output: Callable[[Any], Any]


def _size(pipe: Any, height: int | None, width: int | None, sample_size: int) -> tuple[int, int]:
    """The image size (default: the network's sample size times the VAE's factor), checked."""
    scaling = pipe.vae_scale_factor
    height, width = height or sample_size * scaling, width or sample_size * scaling
    if height % scaling or width % scaling:
        raise ValueError(f"height and width must be multiples of the VAE's factor {scaling}")
    return height, width


def _latent(pipe: Any, channels: int, height: int, width: int) -> tuple[int, int, int]:
    return channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor


def _stable_diffusion(pipe: Any, prompt: Any, negative_prompt: Any, n: int, do_cfg: bool, height: int | None,
                      width: int | None, encode: dict) -> Prepared:
    """Stable Diffusion 1.x / 2.x: text embeddings into a UNet."""
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    unet, vae = pipe.unet, pipe.vae
    pe, ne = pipe.encode_prompt(prompt, pipe._execution_device, n, do_cfg, negative_prompt, **encode)
    height, width = _size(pipe, height, width, unet.config.sample_size)

    def decode(latents: Tensor, output_type: str) -> Any:
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type,
                                                do_denormalize=[True] * image.shape[0])

    return Prepared(unet, {TEXT: pe}, {TEXT: ne} if do_cfg else None,
                    _latent(pipe, unet.config.in_channels, height, width), decode,
                    lambda images: StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None))


def _stable_diffusion_xl(pipe: Any, prompt: Any, negative_prompt: Any, n: int, do_cfg: bool,
                         height: int | None, width: int | None, encode: dict) -> Prepared:
    """SDXL: two text encoders' embeddings, the pooled embedding and the size ids (``added_cond_kwargs``)."""
    from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

    unet, vae = pipe.unet, pipe.vae
    pe, ne, pooled, npooled = pipe.encode_prompt(prompt=prompt, device=pipe._execution_device,
                                                 num_images_per_prompt=n,
                                                 do_classifier_free_guidance=do_cfg,
                                                 negative_prompt=negative_prompt, **encode)
    height, width = _size(pipe, height, width, pipe.default_sample_size)
    proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
    ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pe.dtype,
                                 text_encoder_projection_dim=proj).to(pe.device).repeat(pe.shape[0], 1)

    def inputs(embeds: Tensor, pooled_embeds: Tensor) -> dict:
        return {TEXT: embeds, "added_cond_kwargs": {"text_embeds": pooled_embeds, "time_ids": ids}}

    def decode(latents: Tensor, output_type: str) -> Any:
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            pipe.upcast_vae()
        c = vae.config
        if getattr(c, "latents_mean", None) is not None and getattr(c, "latents_std", None) is not None:
            mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(latents)
                         for v in (c.latents_mean, c.latents_std))
            latents = latents * std / c.scaling_factor + mean
        else:
            latents = latents / c.scaling_factor
        image = vae.decode(latents.to(next(vae.post_quant_conv.parameters()).dtype), return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type=output_type)

    return Prepared(unet, inputs(pe, pooled), inputs(ne, npooled) if do_cfg else None,
                    _latent(pipe, unet.config.in_channels, height, width), decode,
                    lambda images: StableDiffusionXLPipelineOutput(images=images))


def _stable_diffusion_3(pipe: Any, prompt: Any, negative_prompt: Any, n: int, do_cfg: bool,
                        height: int | None, width: int | None, encode: dict) -> Prepared:
    """SD3: an MMDiT transformer under flow matching, text embeddings and pooled projections."""
    from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput

    net, vae = pipe.transformer, pipe.vae
    pe, ne, pooled, npooled = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None,
                                                 device=pipe._execution_device, num_images_per_prompt=n,
                                                 do_classifier_free_guidance=do_cfg,
                                                 negative_prompt=negative_prompt, **encode)
    height, width = _size(pipe, height, width, pipe.default_sample_size)

    def decode(latents: Tensor, output_type: str) -> Any:
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)

    return Prepared(net, {TEXT: pe, "pooled_projections": pooled},
                    {TEXT: ne, "pooled_projections": npooled} if do_cfg else None,
                    _latent(pipe, net.config.in_channels, height, width), decode,
                    lambda images: StableDiffusion3PipelineOutput(images=images))


def adapter_for(pipe: Any) -> Callable[..., Prepared]:
    """The adapter of ``pipe``'s class (SDXL and SD3 before SD: a subclass keeps its base's adapter), or
    ``NotImplementedError`` naming what to use instead (also for a guidance-distilled UNet, e.g. LCM's, whose
    ``time_cond_proj_dim`` takes the guidance scale as an input rather than two calls)."""
    import diffusers

    for cls, adapter in ((diffusers.StableDiffusionXLPipeline, _stable_diffusion_xl),
                         (diffusers.StableDiffusion3Pipeline, _stable_diffusion_3),
                         (diffusers.StableDiffusionPipeline, _stable_diffusion)):
        if isinstance(pipe, cls):
            unet = getattr(pipe, "unet", None)
            if unet is not None and getattr(unet.config, "time_cond_proj_dim", None) is not None:
                raise NotImplementedError("this UNet is guidance-distilled (time_cond_proj_dim, e.g. LCM): "
                                          "it takes the guidance scale as an input, which the runner does "
                                          "not pass; use indis.sample with timestep_cond in cond")
            return adapter
    raise NotImplementedError(
        f"diffusers_pipeline runs StableDiffusionPipeline, StableDiffusionXLPipeline and "
        f"StableDiffusion3Pipeline (and their subclasses), not {type(pipe).__name__}. Use "
        "indis.from_diffusers(model, scheduler) with indis.sample(..., cond=, uncond=, guidance_scale=) on "
        "the inputs the pipe's encoders produce, or keep the pipe and set "
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
    if isinstance(schedule, (list, tuple)):
        schedule = torch.tensor(schedule, dtype=torch.float64)
    if isinstance(schedule, (Tensor, Schedule)):
        steps = (schedule.grid if isinstance(schedule, Schedule) else schedule).shape[-1] - 1
        if nfe is not None and nfe != steps:
            raise ValueError(f"nfe={nfe} but the grid given as schedule has {steps} steps")
        return schedule, _start(schedule, noise, fam)
    if nfe is None:
        raise ValueError("nfe is required unless the schedule is an INDIS predictor or a grid")
    if isinstance(schedule, str) and schedule == "scheduler":
        from indis.engine.pipelines.scheduler import IndisScheduler

        if isinstance(pipe.scheduler, IndisScheduler):  # the shim's own grid, shift and scale
            sched = pipe.scheduler.schedule(nfe)
            init = pipe.scheduler.config.init_noise_sigma
            return sched, (_start(sched, noise, fam) if init is None else noise * float(init))
        grid = grid_from_scheduler(pipe.scheduler, nfe).to(noise.device)
        init = float(getattr(pipe.scheduler, "init_noise_sigma", 1.0))  # FlowMatch: none, the noise itself
        start = noise * init
        if init != 1.0:  # a VE-coordinate scheduler (Euler, Heun, ...)
            start = start * float(fam.alpha(grid[:1].cpu()))
        return grid, start
    lo, hi = fam.sigma_range
    if isinstance(schedule, str) and (schedule in HEURISTICS or schedule == "gits") and not (
            0 < lo and math.isfinite(hi)):
        raise ValueError(f"schedule={schedule!r} needs a finite sigma range, and this model's family {fam!r} "
                         "has none (flow matching): pass 'scheduler', a grid or a predictor")
    if isinstance(schedule, str) and schedule in HEURISTICS:
        grid = get_sigmas(schedule, nfe, lo, hi, family=fam, device=noise.device)
    elif isinstance(schedule, str) and schedule == "gits":
        x = noise * float(fam.s(torch.tensor(hi, dtype=torch.float64)))
        grid = fit_gits(gits_model, x, nfe=nfe, sigma_min=lo, sigma_max=hi, cond=cond)
    else:
        raise ValueError(f"schedule={schedule!r}: use 'scheduler', 'gits', a heuristic {HEURISTICS}, a grid "
                         "[N+1] / [B, N+1], a Schedule or an INDIS Predictor")
    return grid, _start(grid, noise, fam)


def _start(schedule: Tensor | Schedule, noise: Tensor, fam: Any) -> Tensor:
    """The state at each sample's first grid point: ``s(sigma_0)`` times the noise (as in tuning)."""
    first = (schedule.grid if isinstance(schedule, Schedule) else schedule).to(torch.float64)
    first = first[..., 0].reshape(-1, *([1] * (noise.ndim - 1))).cpu()
    return noise * fam.s(first).to(noise.device, noise.dtype)


def infer_rounding(scheduler: Any, steps: int) -> str | None:
    """How ``scheduler`` rounds the timestep it feeds the network on its own grid, found by comparing its
    ``timesteps`` with the exact times of its sigmas: ``"round"`` (integer timesteps, e.g. DPM-Solver with
    Karras sigmas), ``"floor"`` (truncated, e.g. flow-mode DPM-Solver / UniPC) or None (fractional times
    passed as they are)."""
    fresh = copy.deepcopy(scheduler)
    fresh.set_timesteps(steps)
    fed = torch.as_tensor(fresh.timesteps, dtype=torch.float64)
    den = from_diffusers(nn.Identity(), scheduler)
    exact = den.time(grid_from_scheduler(scheduler, steps)[:fed.numel()])
    if exact.numel() != fed.numel() or not torch.equal(fed, fed.round()):
        return None
    for rule, f in (("round", torch.round), ("floor", torch.floor)):
        if torch.equal(f(exact), fed):
            return rule
    return None


class _Interrupted(Exception):
    """``pipe._interrupt`` was set in a step's callback: sampling stops with these latents."""

    def __init__(self, latents: Tensor) -> None:
        super().__init__("interrupted")
        self.latents = latents


#: per pipe, the GraphSampler of each (network, scheduler config, solver, options): its graphs are replayed
#: by later calls of the same shape instead of being captured again
_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _graph_sampler(pipe: Any, den: Denoiser, solver: str, guidance_rescale: float, rounding: str | None,
                   solver_opts: dict) -> GraphSampler:
    key = (id(den.net.model), json.dumps(scheduler_config(pipe.scheduler), sort_keys=True, default=str),
           solver, json.dumps(solver_opts, sort_keys=True, default=str), float(guidance_rescale), rounding)
    samplers = _SAMPLERS.setdefault(pipe, {})
    if key not in samplers:
        samplers[key] = GraphSampler(den, solver, guidance_rescale=guidance_rescale, **solver_opts)
    return samplers[key]


@torch.no_grad()
def diffusers_pipeline(pipe: Any, prompt: str | list[str] | None = None, *, nfe: int | None = None,
                       schedule: Any = "scheduler", solver: str = "dpmpp_2m",
                       negative_prompt: str | list[str] | None = None, prompt_embeds: Tensor | None = None,
                       negative_prompt_embeds: Tensor | None = None, encode_kwargs: dict | None = None,
                       guidance_scale: float | Tensor = 7.5,
                       guidance_rescale: float = 0.0, num_images_per_prompt: int = 1,
                       height: int | None = None, width: int | None = None,
                       seeds: Sequence[int] | None = None, generator: torch.Generator | list | None = None,
                       latents: Tensor | None = None,
                       phi_cond: Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                       callback_on_step_end: Callable[..., dict] | None = None,
                       callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                       progress: bool | None = True, graphs: bool | None = None,
                       timestep_rounding: str | None = None, **solver_opts) -> Any:
    """Generate images with ``pipe`` (a Stable Diffusion, SDXL or SD3 diffusers pipeline; see the module
    docstring) sampled by indis. Prompts are encoded by the pipe's own ``encode_prompt`` (``prompt_embeds``,
    ``negative_prompt_embeds`` and ``encode_kwargs`` -- e.g. SDXL's ``pooled_prompt_embeds``, SD3's
    ``max_sequence_length`` -- are passed to it).

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
    ``"latents"`` replaces the state, the same on every backend, and setting ``pipe._interrupt = True``
    stops after that step (the current latents are decoded), as in diffusers. Unlike diffusers, the callback
    sees the conditional ``prompt_embeds`` alone (not ``[negative; positive]``) and returned embeddings are
    not used; ``PipelineCallback`` objects (which edit embeddings) are refused. ``progress``: a progress bar
    over the network evaluations. ``graphs``: CUDA graphs (default on CUDA without a callback; the sampler
    and its graphs are kept per pipe, so repeated calls of one shape replay). ``timestep_rounding``: as in
    ``from_diffusers``; with ``schedule="scheduler"`` it defaults to the scheduler's own (``infer_rounding``).
    The pipe's safety checker and watermark-free postprocessing options are not applied (``nsfw_content_
    detected`` is None). Returns the pipe's output class (``images``; ``output_type``: pil, np, pt or latent),
    or ``(images,)`` with ``return_dict=False``.
    """
    adapter = adapter_for(pipe)
    try:
        check_solver(solver, solver_opts)
    except ValueError as e:
        raise ValueError(f"{e} (diffusers' own call arguments are not taken: num_inference_steps is nfe; "
                         "image, eta and cross_attention_kwargs have no counterpart)") from None
    if any(c.__name__ in ("PipelineCallback", "MultiPipelineCallbacks")
           for c in type(callback_on_step_end).__mro__):
        raise NotImplementedError("PipelineCallback objects edit prompt embeddings, which indis' callback "
                                  "does not take back; pass a function that returns {'latents': ...} or {}")
    if isinstance(guidance_scale, (list, tuple)):
        guidance_scale = torch.tensor(guidance_scale, dtype=torch.float32)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r}: choose one of {OUTPUT_TYPES}")
    unknown = set(callback_on_step_end_tensor_inputs) - {"latents", "prompt_embeds", "negative_prompt_embeds"}
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not available; choose "
                         "from latents, prompt_embeds, negative_prompt_embeds")
    do_cfg = isinstance(guidance_scale, Tensor) or float(guidance_scale) > 1.0
    encode = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds,
              **(encode_kwargs or {})}
    prep = adapter(pipe, prompt, negative_prompt, num_images_per_prompt, do_cfg, height, width, encode)
    device, dtype = pipe._execution_device, prep.network.dtype
    batch = prep.cond[TEXT].shape[0]
    noise = _initial_noise(batch, prep.shape, seeds, generator, latents, device)
    if isinstance(schedule, str) and schedule == "scheduler" and timestep_rounding is None and nfe:
        from indis.engine.pipelines.scheduler import IndisScheduler

        if not isinstance(pipe.scheduler, IndisScheduler):
            timestep_rounding = infer_rounding(pipe.scheduler, nfe)
    den = from_diffusers(prep.network, pipe.scheduler, timestep_rounding=timestep_rounding)
    model = den
    if do_cfg:
        model = guided(den, prep.uncond, guidance_scale, guidance_rescale=guidance_rescale)
    sched, x = _schedule(schedule, den, pipe, nfe, noise, prep.cond, phi_cond, model)
    x = x.to(dtype)
    grid = as_grid(sched.grid if isinstance(sched, Schedule) else sched, batch_size=batch, device=device)

    pipe._guidance_scale, pipe._num_timesteps, pipe._interrupt = guidance_scale, grid.shape[-1] - 1, False

    def step_end(i: int, y: Tensor) -> Tensor | None:
        t = den.time(grid[:, i].to(torch.float64))
        local = {"latents": y, "prompt_embeds": prep.cond[TEXT],
                 "negative_prompt_embeds": None if prep.uncond is None else prep.uncond[TEXT]}
        out = callback_on_step_end(pipe, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
        edited = out.get("latents") if out else None
        if getattr(pipe, "_interrupt", False):
            raise _Interrupted(y if edited is None else edited)
        return edited

    use_graphs = (x.is_cuda and callback_on_step_end is None) if graphs is None else graphs
    if use_graphs:
        if callback_on_step_end is not None:
            raise ValueError("graphs=True replays one captured call: callback_on_step_end needs graphs=False")
        sampler = _graph_sampler(pipe, den, solver, guidance_rescale, timestep_rounding, solver_opts)
        extra = {"uncond": prep.uncond, "guidance_scale": guidance_scale} if do_cfg else {}
        out = sampler(x, sched, cond=prep.cond, **extra)
    else:
        plan = prepare(model, x, sched, solver, **solver_opts)
        try:
            out = run(plan, x, prep.cond, progress=progress,
                      step_end=step_end if callback_on_step_end is not None else None)
        except _Interrupted as stop:
            out = stop.latents
    images = out if output_type == "latent" else prep.decode(out, output_type)
    return prep.output(images) if return_dict else (images,)


__all__ = ["Prepared", "adapter_for", "diffusers_pipeline", "infer_rounding"]
