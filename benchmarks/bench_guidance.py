"""What classifier-free guidance's combination costs next to the rest of a stage: whether folding it into the
fused step would pay.

Per stage of a CFG sampler: the network on the doubled batch, the combination ``u + g (c - u)`` (one extra
elementwise pass over the state: read two, write one) and the fused ragged step. Timed side by side in one
run (medians over repeats), for a tiny diffusers text UNet and for a trivial network (the combination's
largest possible share).

    python benchmarks/bench_guidance.py [--batch 8] [--size 32] [--out benchmarks/results/diffusers]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import indis
from indis.engine.core.guidance import guided_raw
from indis.engine.testbeds.tiny_diffusers import TEXT, text_unet
from indis.kernels.ragged_step import backend_for, ragged_step


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


@torch.no_grad()
def stage_costs(den: indis.Denoiser, x: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict,
                grid: torch.Tensor, backend: str, repeats: int) -> tuple[float, float, float, float]:
    """Median ms of a CFG stage's parts: the doubled-batch network call, the combination, the fused step,
    and the guided call (network + combination) as ``guidance.guided_raw`` makes it."""
    b = x.shape[0]
    both = {TEXT: torch.cat([uncond[TEXT].expand(b, -1, -1), cond[TEXT]])}
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])
    u, c = den.raw(x2, t2, **both).chunk(2)
    packed = indis.prepare(den, x, grid, "dpmpp_2m").packed
    y, raw = x.clone(), torch.randn_like(x)
    stash, hist = torch.empty_like(y), y.new_empty((packed.history, *y.shape))
    stage = torch.ones(b, dtype=torch.int32)
    return (median_ms(lambda: den.raw(x2, t2, **both), repeats),
            median_ms(lambda: u + 7.5 * (c - u), repeats),
            median_ms(lambda: ragged_step(y, raw, stash, hist, packed, stage, backend), repeats),
            median_ms(lambda: guided_raw(den, x, t, cond, uncond, 7.5), repeats))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=32, help="latent height and width (4 channels)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    import diffusers

    torch.set_num_threads(2)
    b, shape = args.batch, (4, args.size, args.size)
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                  beta_end=0.012)
    nets = {"tiny text UNet": indis.from_diffusers(text_unet(sample_size=args.size), sched),
            "trivial network": indis.Denoiser(lambda x, t, **c: x * 0.5, "vp_linear", "eps", "t")}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, *shape, generator=g)
    cond, uncond = {TEXT: torch.randn(b, 8, 12, generator=g)}, {TEXT: torch.zeros(1, 8, 12)}
    t = torch.full((b,), 500.0)
    grid = indis.grid_from_scheduler(sched, 10)
    backend = backend_for(x.device, None)
    rows = []
    for name, den in nets.items():
        network, combine, step, whole = stage_costs(den, x, t, cond, uncond, grid, backend, args.repeats)
        total = network + combine + step
        rows.append(f"| {name} | {network:.3f} | {combine:.3f} | {step:.3f} | {whole:.3f} | "
                    f"{100 * combine / total:.1f} % |")
    lines = [f"CFG stage cost, CPU (2 threads), batch {b}, latents {shape}, backend {backend}, median of "
             f"{args.repeats} (ms)", "",
             "| network | doubled-batch network call | combination u + g(c - u) | fused step | guided call "
             "(network + combination) | combination share of a stage |", "|---|---|---|---|---|---|", *rows]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        given = argv if argv is not None else sys.argv[1:]
        command = "python benchmarks/bench_guidance.py " + " ".join(given)
        (args.out / "guidance-cost.md").write_text(f"`{command.strip()}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
