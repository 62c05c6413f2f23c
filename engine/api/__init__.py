"""indis: instance-aware few-step diffusion sampling (INDIS, Yuan et al., CVPR 2026).

Public surface: per-sample ("ragged") multistep solvers over ``[B, N+1]`` grids, noise families and the
k-diffusion denoiser convention, heuristic discretizations, and the INDIS schedule predictor with its tuning
(``fit_predictor``, ``fit_global`` for LD3, ``fit_oracle``), the fused Triton step (``indis.kernels``) and
whole-call CUDA graphs (``GraphSampler``). The implementation lives in ``indis.engine``.
"""

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
from indis.engine.core.predictor import PerInstanceSchedule, Predictor, PredictorConfig, ScheduleConfig
from indis.engine.core.sampling import (
    Plan,
    prepare,
    run,
    run_fused,
    run_table,
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
from indis.engine.tuning.fit import FitConfig, fit_global, fit_oracle, fit_predictor
from indis.engine.tuning.teacher import TeacherCache, TeacherSpec, noise_from_seeds

__version__ = "0.1.0"

__all__ = [
    "AYS_TABLES", "SOLVERS", "VE", "Denoiser", "FitConfig", "Flow", "GraphSampler", "NoiseFamily",
    "PerInstanceSchedule", "Plan", "Predictor", "PredictorConfig", "Schedule", "ScheduleConfig",
    "SolverTable", "TeacherCache", "TeacherSpec", "VPCosine", "VPDiscrete", "VPLinear", "as_grid",
    "fit_global", "fit_oracle",
    "fit_predictor", "noise_from_seeds", "build_table", "get_family", "get_sigmas", "grid_from_logits",
    "logits_from_grid", "prepare", "run", "run_fused", "run_table", "sample", "sample_dpmpp_2m",
    "sample_dpmpp_3m", "sample_euler", "sample_heun", "sample_ipndm", "sample_ipndm_v", "sample_unipc",
]
