"""A diffusers scheduler that steps indis' solvers on one shared grid, for users who keep their pipeline.

``pipe.scheduler = IndisScheduler.from_config(pipe.scheduler.config, sigmas=grid, solver="dpmpp_2m")`` puts a
grid tuned by indis -- an INDIS predictor's mean schedule (with its time shift and noise scale), GITS, LD3,
AYS -- into an unchanged diffusers pipeline. The noise family, prediction type and time input come from the
replaced scheduler's config, as in ``indis.from_diffusers``; each :meth:`IndisScheduler.step` is one stage of
the solver's coefficient table (``sampling.stage_update``), so the pipeline's loop computes what
``indis.sample`` computes on that grid.

Limits (a diffusers pipeline passes one timestep for the whole batch): the grid is shared by every sample --
per-sample INDIS schedules need ``indis.diffusers_pipeline`` or ``indis.sample`` --; the number of inference
steps is the grid's, and sigmas, timesteps or ``mu`` a pipeline passes to ``set_timesteps`` (FLUX does) are
ignored for it; a flow-matching model needs an explicit grid, without a time shift (SD3 / FLUX pipelines never
call ``scale_model_input``, where the shift's rescaled input is made); ``add_noise`` (img2img, inpainting)
is not provided.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from torch import Tensor, nn

from indis.engine.core.external import from_diffusers, scheduler_config
from indis.engine.core.families import Flow
from indis.engine.core.sampling import Stage, stage_update, stage_views, table_for
from indis.engine.core.schedules import HEURISTICS, Schedule, get_sigmas
from indis.engine.core.solvers import SOLVERS


class IndisScheduler(SchedulerMixin, ConfigMixin):
    """indis' solver on one shared grid as a diffusers scheduler (see the module docstring).

    ``base_config``: the replaced scheduler's config (family, prediction type, time input). ``sigmas``: the
    grid ``[N+1]`` (descending; ending at 0 or not), with optional per-step ``shift`` / ``scale`` ``[N]``
    (an INDIS mean schedule); without ``sigmas``, the heuristic ``schedule`` over the family's sigma range
    for the pipeline's number of steps. ``solver`` / ``solver_options``: as in ``indis.sample``.
    ``init_noise_sigma``: the start's noise scale (default ``s(sigma_max)``, the family's, as indis starts;
    1.0 reproduces DPM-Solver / UniPC pipelines). ``timestep_rounding``: as in ``indis.from_diffusers``.
    """

    order = 1

    @register_to_config
    def __init__(self, base_config: dict | None = None, sigmas: Sequence[float] | None = None,
                 shift: Sequence[float] | None = None, scale: Sequence[float] | None = None,
                 schedule: str = "edm", solver: str = "dpmpp_2m", solver_options: dict | None = None,
                 init_noise_sigma: float | None = None, timestep_rounding: str | None = None) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"solver={solver!r} is unknown; choose one of {SOLVERS}")
        if sigmas is None and (shift is not None or scale is not None):
            raise ValueError("shift / scale belong to a grid: pass sigmas too")
        if sigmas is None and schedule not in HEURISTICS:
            raise ValueError(f"schedule={schedule!r}: give sigmas or a heuristic {HEURISTICS}")
        self.denoiser = from_diffusers(nn.Identity(), dict(base_config or {}),
                                       timestep_rounding=timestep_rounding)
        if isinstance(self.denoiser.family, Flow) and (sigmas is None or shift is not None):
            raise ValueError("a flow-matching model needs an explicit grid (sigmas=) and no shift: its "
                             "heuristics have no finite sigma range, and SD3 / FLUX pipelines never call "
                             "scale_model_input, where a shift's rescaled input is made")
        # saved as plain lists (a tensor grid would not serialise with save_config / save_pretrained)
        self.register_to_config(**{k: None if v is None else torch.as_tensor(v, dtype=torch.float64).tolist()
                                   for k, v in (("sigmas", sigmas), ("shift", shift), ("scale", scale))})
        self.timesteps: Tensor | None = None
        self.sigmas: Tensor | None = None
        self._table = None
        self._stages: tuple[Stage, ...] = ()
        self._state: tuple[Tensor, list[Tensor]] | None = None
        self._stage = 0

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False,
                    **kwargs: Any) -> IndisScheduler:
        """From another scheduler's config (its family and prediction type) and this class' options
        (``sigmas``, ``shift``, ``scale``, ``schedule``, ``solver``, ...); an IndisScheduler's own config
        loads as saved."""
        own = dict(getattr(config, "config", config) or {})
        if own.get("_class_name") != cls.__name__:  # another scheduler's: it becomes the base config
            base = scheduler_config(config)
            own = {"base_config": {k: v for k, v in base.items()
                                   if not k.startswith("_") or k == "_class_name"}}
        config = own
        return super().from_config({**config, **kwargs}, return_unused_kwargs=return_unused_kwargs)

    @property
    def init_noise_sigma(self) -> float:
        """What the pipeline multiplies its standard-normal latents by."""
        if self.config.init_noise_sigma is not None:
            return float(self.config.init_noise_sigma)
        if self.sigmas is None:
            raise RuntimeError("call set_timesteps first")
        return float(self.denoiser.family.s(self.sigmas[:1].double().cpu()))

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: Any = None, timesteps: Any = None, mu: float | None = None, **_: Any) -> None:
        """The grid (``sigmas`` of the config, or the heuristic for ``num_inference_steps``), its coefficient
        table and the network time of every stage (``timesteps``: one per network evaluation). ``sigmas``,
        ``timesteps`` and ``mu`` a pipeline passes are ignored: this scheduler runs its own grid."""
        c = self.config
        try:
            sched = self.schedule(num_inference_steps)
        except ValueError as e:
            raise ValueError(f"{e}; call the pipeline with num_inference_steps={len(c.sigmas) - 1}"
                             if c.sigmas is not None else str(e)) from None
        grid, shift, scale = (None if v is None else v.to(device)[None]
                              for v in (sched.grid, sched.shift, sched.scale))
        self._table = table_for(self.denoiser, grid, c.solver, torch.float32, shift=shift, scale=scale,
                                **(c.solver_options or {}))
        self.sigmas = grid[0].float()
        time = self.denoiser.time(self._table.sigma_eval[0])
        rounding = {"round": torch.round, "floor": torch.floor, None: lambda t: t}[c.timestep_rounding]
        self.timesteps = rounding(time.float())
        self.num_inference_steps = grid.shape[-1] - 1
        self._stages, self._state, self._stage = (), None, 0

    def schedule(self, num_inference_steps: int | None = None) -> Schedule:
        """This scheduler's grid ``[N+1]`` with its shift and scale ``[N]`` as an indis :class:`Schedule`."""
        c = self.config
        if c.sigmas is None:
            if num_inference_steps is None:
                raise ValueError("num_inference_steps is required without a grid in the config")
            lo, hi = self.denoiser.family.sigma_range
            return Schedule(get_sigmas(c.schedule, num_inference_steps, lo, hi, family=self.denoiser.family))
        if num_inference_steps is not None and num_inference_steps != len(c.sigmas) - 1:
            raise ValueError(f"this IndisScheduler holds a grid of {len(c.sigmas) - 1} steps, not "
                             f"{num_inference_steps}")
        return Schedule(*(None if v is None else torch.tensor(v, dtype=torch.float64)
                          for v in (c.sigmas, c.shift, c.scale)))

    def scale_model_input(self, sample: Tensor, timestep: Tensor | float | None = None) -> Tensor:
        """The network's input at the current stage (the state, rescaled where a time shift moves a VP /
        flow model's evaluation point)."""
        stage = self._current(sample)
        return sample if stage.in_scale is None else sample * stage.in_scale

    def step(self, model_output: Tensor, timestep: Tensor | float, sample: Tensor, return_dict: bool = True,
             **_: Any) -> SchedulerOutput | tuple[Tensor]:
        """One stage of the solver: ``sample`` and the network's output there -> the next state."""
        stage = self._current(sample)
        if self._state is None:
            self._state = (sample, [])
        stash, hist = self._state
        y, stash, hist = stage_update(stage, sample, stash, hist, model_output.to(sample.dtype),
                                      self._table.history)
        self._state, self._stage = (stash, hist), self._stage + 1
        return SchedulerOutput(prev_sample=y) if return_dict else (y,)

    def _current(self, sample: Tensor) -> Stage:
        if self._table is None:
            raise RuntimeError("call set_timesteps first")
        if self._stage >= self._table.nfe:
            raise RuntimeError(f"all {self._table.nfe} stages have run; call set_timesteps to start again")
        if not self._stages or self._stages[0].time.dtype != sample.dtype:
            shape = (1, *sample.shape[1:])  # one shared grid: views broadcast over the batch
            self._stages = stage_views(self._table, self.denoiser.time(self._table.sigma_eval), shape,
                                        sample.dtype)
        return self._stages[self._stage]


__all__ = ["IndisScheduler"]
