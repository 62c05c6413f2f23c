"""Models and schedulers of diffusers, adapted once (as k-diffusion's ``external`` wrappers do).

:func:`from_diffusers` turns a diffusers network (``UNet2DModel``, ``UNet2DConditionModel``, an SD3 /
FLUX-style transformer, or anything called as ``model(sample, timestep=t, **cond)``) and its scheduler's
config into a :class:`~indis.engine.core.families.Denoiser`: the noise family, prediction type and time input
come from the config, the output is unwrapped (``.sample``, tuples) and learned-variance channels are split
off, so every indis entry point takes it. :func:`grid_from_scheduler` gives a scheduler's own discretization
as indis sigmas.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from indis.engine.core.families import Denoiser, Flow, NoiseFamily, VPDiscrete
from indis.engine.core.schedules import as_grid

Rounding = Literal["round", "floor"]
#: diffusers' ``prediction_type`` -> indis' prediction
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "velocity"}


def scheduler_config(scheduler_or_config: Any) -> dict[str, Any]:
    """A scheduler's config (diffusers' ``FrozenDict`` included) as a plain dict; for an ``IndisScheduler``,
    the config of the scheduler it replaced (which says the model's family and prediction type)."""
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    if not isinstance(config, Mapping):
        raise ValueError("expected a diffusers scheduler or its config, got "
                         f"{type(scheduler_or_config).__name__}")
    config = dict(config)
    if config is not scheduler_or_config and hasattr(scheduler_or_config, "set_timesteps"):
        config.setdefault("_class_name", type(scheduler_or_config).__name__)
    if config.get("_class_name") == "IndisScheduler" and isinstance(config.get("base_config"), Mapping):
        return dict(config["base_config"])  # indis' scheduler shim: the replaced scheduler's config
    return config


#: config settings whose model inputs or noise tables indis does not reproduce: refused, never guessed
UNSUPPORTED = {
    "timestep_type": ("continuous", "a continuous time input (0.25 log sigma, EDM-style)"),
    "rescale_betas_zero_snr": (True, "zero-terminal-SNR betas (sigma = inf at the last timestep)"),
}


def is_flow(config: Mapping[str, Any]) -> bool:
    """Whether a scheduler config describes flow matching (``FlowMatch*`` schedulers, or DPM-Solver / UniPC
    with ``use_flow_sigmas``)."""
    return "FlowMatch" in str(config.get("_class_name", "")) or bool(config.get("use_flow_sigmas")) or (
        "shift" in config and "beta_schedule" not in config)


def check_supported(config: Mapping[str, Any]) -> None:
    """Refuse a scheduler config whose family or time input indis does not reproduce."""
    name = str(config.get("_class_name") or "")
    if name.startswith("EDM") or "sigma_data" in config:
        name = name or "this config"
        raise ValueError(f"{name} is an EDM (VE) scheduler, whose model takes EDM-preconditioned inputs; "
                         "wrap the model as a k-diffusion denoiser (model(x, sigma) -> x0) for indis instead")
    for key, (value, what) in UNSUPPORTED.items():
        if config.get(key) == value:
            raise ValueError(f"{key}={value!r} ({what}) is not supported by from_diffusers")
    if config.get("prediction_type") == "flow_prediction" and not is_flow(config):
        raise ValueError("prediction_type='flow_prediction' needs use_flow_sigmas=True (flow sigmas)")


def family_from_config(scheduler_or_config: Any) -> NoiseFamily:
    """The noise family a diffusers scheduler config describes: ``Flow`` for flow matching, else the discrete
    VP of its betas (``trained_betas`` when given, accumulated in float32 as diffusers does)."""
    config = scheduler_config(scheduler_or_config)
    check_supported(config)
    if is_flow(config):
        return Flow()
    betas = config.get("trained_betas")
    if betas is not None:
        betas = torch.as_tensor(betas, dtype=torch.float32)
        return VPDiscrete(torch.cumprod(1.0 - betas, dim=0).double())
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    return VPDiscrete.from_config(**{k: config[k] for k in keys if config.get(k) is not None})


class DiffusersNet(nn.Module):
    """``net(x, t, **cond) -> raw`` around a diffusers model: the timestep passed by keyword (SD3 / FLUX take
    ``encoder_hidden_states`` second), optionally rounded or floored as a pipeline does, the output unwrapped
    and learned-variance channels (twice the input's channels) split off. Other keywords
    (``encoder_hidden_states``, ``added_cond_kwargs``, ``timestep_cond``, ``class_labels``, ...) pass
    through."""

    def __init__(self, model: nn.Module, timestep_rounding: Rounding | None = None,
                 learned_variance: bool = False) -> None:
        super().__init__()
        if timestep_rounding not in (None, "round", "floor"):
            raise ValueError(f"timestep_rounding={timestep_rounding!r}: choose None, 'round' or 'floor'")
        self.model, self.timestep_rounding = model, timestep_rounding
        self.learned_variance = learned_variance

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if self.timestep_rounding == "round":
            t = t.round()
        elif self.timestep_rounding == "floor":
            t = t.floor()
        out = self.model(x, timestep=t, **cond)
        if isinstance(out, Mapping):
            out = out["sample"] if "sample" in out else next(iter(out.values()))
        elif not isinstance(out, Tensor):
            out = out.sample if hasattr(out, "sample") else out[0]
        if self.learned_variance and out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # the scheduler's variance_type is learned: keep the mean's half
        return out


def from_diffusers(model: nn.Module, scheduler_or_config: Any, *, timestep_rounding: Rounding | None = None,
                   time_scale: float | None = None) -> Denoiser:
    """A diffusers model as an indis :class:`~indis.engine.core.families.Denoiser`.

    The family, prediction type and time input come from ``scheduler_or_config`` (DDPM, DDIM, Euler,
    DPM-Solver, UniPC: the discrete VP of their betas, ``prediction_type`` epsilon / v_prediction / sample,
    the model called at the fractional timestep index; FlowMatch: the flow family, velocity prediction, the
    model called at ``num_train_timesteps * t``, or ``time_scale * t``). ``timestep_rounding``: ``"round"`` or
    ``"floor"`` the timestep the model receives as a pipeline does (e.g. DPM-Solver with Karras sigmas rounds,
    flow-mode DPM / UniPC truncate) for bit-level parity; None hands it the exact value. ``x`` and the result
    of ``indis.sample`` are in the model's own coordinate: start a VP model at ``alpha * sigma_max * noise``
    (``teacher.initial_state``; about ``noise``, as DPM-Solver and UniPC pipelines do) and a flow model at
    ``noise`` (t = 1). A FLUX-style transformer (its class named Flux / Chroma / LongCat), which scales t by
    1000 itself, gets ``time_scale=1``. Refused: EDM schedulers, ``timestep_type="continuous"``,
    ``rescale_betas_zero_snr``. The time input is cast to the state's dtype before it is rounded: for
    bit-level parity with a pipeline, sample in float32."""
    config = scheduler_config(scheduler_or_config)
    family = family_from_config(config)
    learned = str(config.get("variance_type", "")).startswith("learned")
    net = DiffusersNet(model, timestep_rounding, learned)
    clipping = [k for k in ("clip_sample", "thresholding") if config.get(k)]
    if clipping:
        warnings.warn(f"the scheduler config sets {' and '.join(clipping)}: indis does not clip or threshold "
                      "the x0 estimate, so results differ from that scheduler's wherever it would",
                      stacklevel=2)
    if isinstance(family, Flow):
        if time_scale is None:  # FLUX-style transformers take t in [0, 1] (they scale it by 1000 inside)
            flux = any(k in type(model).__name__ for k in ("Flux", "Chroma", "LongCat"))
            time_scale = 1.0 if flux else float(config.get("num_train_timesteps", 1000))
        scale = float(time_scale)
        return Denoiser(net, family, "velocity", "t", time_scale=scale)
    kind = config.get("prediction_type", "epsilon")
    if kind not in PREDICTIONS or kind == "flow_prediction":
        raise ValueError(f"prediction_type={kind!r} is not one of epsilon, v_prediction, sample")
    return Denoiser(net, family, PREDICTIONS[kind], "t", time_scale=1.0 if time_scale is None else time_scale)


def grid_from_scheduler(scheduler: Any, num_inference_steps: int, *, device: torch.device | str | None = None,
                        **set_timesteps_kwargs: Any) -> Tensor:
    """The grid a diffusers scheduler runs for ``num_inference_steps``, as indis sigmas (float64, descending):
    the scheduler's own ``sigmas`` (Heun's repeated points once; a flow scheduler's ``sigmas`` are flow t,
    converted to sigma = t / (1 - t), so t = 1 is sigma = inf), or for DDPM / DDIM its ``timesteps`` mapped
    through its family, ending where its last step lands (sigma 0, or ``final_alpha_cumprod`` without
    ``set_alpha_to_one``; a last step that does not move is left out). ``set_timesteps_kwargs`` go to
    ``set_timesteps`` (e.g. ``mu`` for dynamic shifting). The caller's scheduler is not changed (a copy is
    set). A scheduler whose steps are not a walk along one grid is refused."""
    steps = num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} must be a positive int")
    if not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "config"):
        raise ValueError(f"expected a diffusers scheduler, got {type(scheduler).__name__}")
    family = family_from_config(scheduler)
    fresh = copy.deepcopy(scheduler)
    fresh.set_timesteps(steps, **set_timesteps_kwargs)
    sigmas = getattr(fresh, "sigmas", None)
    if sigmas is not None:
        grid = torch.unique_consecutive(torch.as_tensor(sigmas, dtype=torch.float64))
        if isinstance(family, Flow):
            grid = as_grid(timesteps=grid, family="flow")[0]
    else:
        t = torch.unique_consecutive(torch.as_tensor(fresh.timesteps, dtype=torch.float64))
        jump = fresh.config.num_train_timesteps // steps
        if t.numel() != steps or bool((t[:-1] - t[1:] != jump).any()):
            raise ValueError(f"{type(scheduler).__name__} steps from t to t - {jump}, which is not its next "
                             f"timestep with these settings ({fresh.timesteps.tolist()[:4]}...): not one "
                             "grid")
        grid = family.sigma(t)
        final = float(getattr(fresh, "final_alpha_cumprod", 1.0))
        end = grid.new_full((1,), math.sqrt((1 - final) / final))
        if not torch.isclose(end, grid[-1:], rtol=1e-12, atol=0).item():  # a step that does not move: none
            grid = torch.cat([grid, end])
    if grid.numel() not in (steps, steps + 1):
        raise ValueError(f"{type(scheduler).__name__} with these settings runs {steps} steps over "
                         f"{grid.numel()} distinct sigmas: not a grid indis can run")
    return grid.to(device) if device is not None else grid
