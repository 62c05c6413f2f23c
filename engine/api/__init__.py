"""indis: instance-aware few-step diffusion sampling (INDIS, Yuan et al., CVPR 2026).

Public surface: per-sample ("ragged") multistep solvers over ``[B, N+1]`` grids, noise families and the
k-diffusion denoiser convention, heuristic discretizations. The implementation lives in ``indis.engine``.
"""

from indis.engine.families import VE, Denoiser, Flow, NoiseFamily, VPCosine, VPDiscrete, VPLinear, get_family
from indis.engine.sampling import (
    Plan,
    prepare,
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
from indis.engine.schedules import AYS_TABLES, as_grid, get_sigmas, grid_from_logits, logits_from_grid
from indis.engine.solvers import SOLVERS, SolverTable, build_table

__version__ = "0.1.0"

__all__ = [
    "AYS_TABLES", "SOLVERS", "VE", "Denoiser", "Flow", "NoiseFamily", "Plan", "SolverTable", "VPCosine",
    "VPDiscrete", "VPLinear", "as_grid", "build_table", "get_family", "get_sigmas", "grid_from_logits",
    "logits_from_grid", "prepare", "run_table", "sample", "sample_dpmpp_2m", "sample_dpmpp_3m",
    "sample_euler", "sample_heun", "sample_ipndm", "sample_ipndm_v", "sample_unipc",
]
