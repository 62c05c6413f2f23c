"""indis: instance-aware few-step diffusion sampling (INDIS, Yuan et al., CVPR 2026).

What users call: ``sample`` (and ``prepare`` / ``run`` to split host work from the loop) with per-sample
("ragged") multistep solvers over ``[B, N+1]`` grids, the k-diffusion-shaped ``sample_*`` samplers, noise
families and the denoiser convention, heuristic discretizations and ``Schedule``, the INDIS schedule predictor
and its tuning (``fit_predictor``; ``fit_global`` for LD3, ``fit_gits`` for GITS, ``fit_oracle``),
diffusers models and schedulers (``from_diffusers``, ``grid_from_scheduler``), classifier-free guidance
(``sample(..., uncond=, guidance_scale=)``; ``guided`` wraps a model for tuning),
whole-call CUDA graphs (``GraphSampler``) and step-level continuous batching (``ContinuousBatcher``,
``Request``). The layers underneath live in ``indis.engine`` (``core``, ``tuning``, ``serving``,
``testbeds``, ``studies``), ``indis.kernels`` (the fused step) and ``indis.export`` (ONNX / TensorRT).
"""

from indis.engine.core.external import from_diffusers, grid_from_scheduler
from indis.engine.core.families import (
    VE,
    Denoiser,
    Flow,
    NoiseFamily,
    VPCosine,
    VPDiscrete,
    VPLinear,
    get_family,
)
from indis.engine.core.graphs import GraphSampler
from indis.engine.core.guidance import guided
from indis.engine.core.predictor import PerInstanceSchedule, Predictor, PredictorConfig, ScheduleConfig
from indis.engine.core.sampling import (
    Plan,
    prepare,
    run,
    sample,
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_euler,
    sample_heun,
    sample_ipndm,
    sample_ipndm_v,
    sample_unipc,
)
from indis.engine.core.schedules import (
    AYS_TABLES,
    Schedule,
    as_grid,
    get_sigmas,
    grid_from_logits,
    logits_from_grid,
)
from indis.engine.core.solvers import SOLVERS, SolverTable, build_table
from indis.engine.pipelines.runner import diffusers_pipeline
from indis.engine.serving.allocation import NFEChooser
from indis.engine.serving.batcher import ContinuousBatcher, Request, TensorCondition
from indis.engine.tuning.fit import FitConfig, fit_gits, fit_global, fit_oracle, fit_predictor
from indis.engine.tuning.teacher import TeacherSpec, noise_from_seeds

__version__ = "0.1.0"


def __getattr__(name: str):
    """``IndisScheduler`` is a diffusers scheduler: imported on first use, so ``import indis`` needs no
    diffusers."""
    if name == "IndisScheduler":
        from indis.engine.pipelines.scheduler import IndisScheduler

        return IndisScheduler
    raise AttributeError(f"module 'indis' has no attribute {name!r}")


__all__ = [
    "AYS_TABLES", "ContinuousBatcher", "Denoiser", "FitConfig", "Flow", "GraphSampler", "NFEChooser",
    "NoiseFamily", "PerInstanceSchedule", "Plan", "Predictor", "PredictorConfig", "Request", "SOLVERS",
    "Schedule", "ScheduleConfig", "SolverTable", "TeacherSpec", "TensorCondition", "VE", "VPCosine",
    "VPDiscrete", "VPLinear", "as_grid", "build_table", "diffusers_pipeline", "fit_gits", "fit_global",
    "fit_oracle", "fit_predictor", "from_diffusers", "get_family", "get_sigmas", "grid_from_logits",
    "grid_from_scheduler", "guided", "logits_from_grid", "noise_from_seeds", "prepare", "run", "sample",
    "sample_dpmpp_2m", "sample_dpmpp_3m", "sample_euler", "sample_heun", "sample_ipndm", "sample_ipndm_v",
    "sample_unipc",
]
