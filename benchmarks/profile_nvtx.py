"""A short INDIS sampling run to look at in Nsight Systems (NVTX domain ``indis``).

    nsys profile --trace=cuda,nvtx -o indis python benchmarks/profile_nvtx.py
    nsys stats --report nvtx_sum indis.nsys-rep

Ranges: ``predictor``, ``coefficients``, ``denoiser k`` and ``step k`` (one fused launch each). Runs on the
digits UNet with a predictor at NFE 5, eager, on CUDA if present.
"""

from __future__ import annotations

import torch

import indis
from indis.engine.core.profiling import enabled
from indis.engine.testbeds.digits import load_backbone


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = load_backbone("unet").to(device)
    sched = indis.ScheduleConfig(nfe=5, sigma_min=0.002, sigma_max=80.0)
    cfg = indis.PredictorConfig(sched, "ipndm", (1, 8, 8))
    phi = indis.Predictor(cfg).to(device)
    x = torch.randn(16, 1, 8, 8, device=device) * 80
    with torch.no_grad():
        for _ in range(3):
            out = indis.sample(unet, x, phi(x), "ipndm")
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"NVTX ranges {'on' if enabled() else 'off (nvtx not installed or INDIS_NVTX=0)'}; "
          f"output finite: {bool(torch.isfinite(out).all())}")


if __name__ == "__main__":
    main()
