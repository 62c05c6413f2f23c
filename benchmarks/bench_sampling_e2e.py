"""End-to-end sampling benchmark: samples/s and per-stage latency, indis eager / CUDA graph vs diffusers.

GPU: a UNet-sized denoiser (the project's EDM UNet class at 4x64x64 latents, channels 128/256/256, random
weights, bfloat16 weights and state) at B in {1, 8, 64}, NFE 5:

* ``indis INDIS eager``: predictor phi(x_T) -> per-sample grid/shift/scale -> coefficient table (built on the
  device without host syncs) -> 5 x (denoiser call + one fused ragged step), iPNDM;
* ``indis INDIS graph``: the same call captured once by ``GraphSampler`` and replayed (new x_T each time);
* ``indis dpmpp_2m eager`` / ``graph``: a shared 5-step EDM grid, DPM-Solver++(2M), no predictor;
* ``diffusers DPM++(2M) loop``: ``DPMSolverMultistepScheduler(solver_order=2)``, the usual
  ``scale_model_input -> model -> step`` loop around the same network (its own timesteps).

Latency per call with CUDA events (P50/P95/P99 over the repeats); samples/s = B / P50. Per-stage latency of
the eager INDIS call (predictor, coefficients, each denoiser call, each fused step) comes from events recorded
around the network call by a thin wrapper, so the sampler code is timed as shipped. A trivial network
(``x * 0.5``) row gives the per-step overhead (host + launches) on the GPU.

CPU (no CUDA): runs the core issue's host-overhead benchmark (``bench_host_overhead.py``: µs per step,
indis vs diffusers, trivial model, one process) with fewer repeats, plus the fused loop's torch path.

Run:  python benchmarks/bench_sampling_e2e.py [--batch-sizes 1,8,64] [--reps 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import indis
from indis.engine.core.graphs import GraphSampler
from indis.engine.core.sampling import make_plan, run
from indis.engine.core.solvers import build_table
from indis.engine.testbeds.digits import DigitsUNet

NFE = 5
SHAPE = (4, 64, 64)


def unet_sized(device: torch.device, dtype: torch.dtype) -> DigitsUNet:
    """The project's UNet class at latent-diffusion size, random (nonzero) weights."""
    torch.manual_seed(0)
    net = DigitsUNet(img_resolution=64, in_channels=4, channels=(128, 256, 256), num_blocks=1,
                     attn_levels=(2,), emb_dim=256, heads=8)
    for p in net.parameters():
        if p.ndim > 1 and not p.detach().any():  # zero-initialised output layers
            nn.init.normal_(p, std=0.02)
    return net.to(device=device, dtype=dtype).eval()


class Marked(nn.Module):
    """Records a CUDA event before and after each network call (stage latency without touching the loop)."""

    def __init__(self, net: Callable) -> None:
        super().__init__()
        self.net, self.marks = net, None

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        if self.marks is not None:
            self.marks.append(_event())
        out = self.net(x, sigma, **cond)
        if self.marks is not None:
            self.marks.append(_event())
        return out


def _event() -> torch.cuda.Event:
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)

    def q(p: float) -> float:
        return s[min(len(s) - 1, round(p * (len(s) - 1)))]

    return {"p50": statistics.median(s), "p95": q(0.95), "p99": q(0.99), "n": len(s)}


def time_call(fn: Callable[[], object], reps: int, warmup: int = 3) -> list[float]:
    """Milliseconds per call (CUDA events), one sample per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start = _event()
        fn()
        end = _event()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def diffusers_loop(net: Callable, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(solver_order=2)

    def call() -> torch.Tensor:
        sched.set_timesteps(NFE, device=x.device)
        lat = x
        for t in sched.timesteps:
            inp = sched.scale_model_input(lat, t)
            out = net(inp, t.to(x.dtype).expand(x.shape[0]))
            lat = sched.step(out, t, lat).prev_sample
        return lat

    return call


def predictor_for(device: torch.device) -> indis.Predictor:
    sched = indis.ScheduleConfig(nfe=NFE, sigma_min=0.002, sigma_max=80.0)
    cfg = indis.PredictorConfig(sched, "ipndm", SHAPE, pool=8)
    phi = indis.Predictor(cfg)
    nn.init.normal_(phi.out.weight, std=0.02)  # instance-dependent output
    return phi.to(device).eval()


def indis_eager(net: Callable, phi: indis.Predictor, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One INDIS call as GraphSampler's body runs it, eagerly: predictor, table, fused loop."""
    den = indis.Denoiser(net, "ve", "x0", "sigma")

    def call() -> torch.Tensor:
        sched = phi(x)
        table = build_table("ipndm", sched.grid, den.family, shift=sched.shift, scale=sched.scale,
                            final_zero=False, infinite_start=False, check_finite=False)
        return run(make_plan(den, table, x), x)

    return call


def stage_latency(net: nn.Module, phi: indis.Predictor, x: torch.Tensor, reps: int) -> dict[str, dict]:
    """Per-stage latency of the eager INDIS call (events between stages)."""
    marked = Marked(net)
    den = indis.Denoiser(marked, "ve", "x0", "sigma")
    stages: dict[str, list[float]] = {}
    for rep in range(reps + 2):
        marked.marks = []
        e0 = _event()
        sched = phi(x)
        e1 = _event()
        table = build_table("ipndm", sched.grid, den.family, shift=sched.shift, scale=sched.scale,
                            final_zero=False, infinite_start=False, check_finite=False)
        plan = make_plan(den, table, x)
        e2 = _event()
        run(plan, x)
        end = _event()
        end.synchronize()
        if rep < 2:
            continue
        marks = marked.marks
        spans = [("predictor", e0, e1), ("coefficients", e1, e2)]
        for k in range(NFE):
            spans.append((f"denoiser {k}", marks[2 * k], marks[2 * k + 1]))
            spans.append((f"step {k}", marks[2 * k + 1], marks[2 * k + 2] if k + 1 < NFE else end))
        for name, a, b in spans:
            stages.setdefault(name, []).append(a.elapsed_time(b))
    marked.marks = None
    return {k: percentiles(v) for k, v in stages.items()}


def build_methods(net: nn.Module, phi: indis.Predictor, trivial: Callable, grid: torch.Tensor,
                  x: torch.Tensor, graphs: dict[str, GraphSampler]) -> dict[str, Callable[[], object]]:
    return {
        "indis INDIS eager (ipndm, fused)": indis_eager(net, phi, x),
        "indis INDIS graph (ipndm, fused)": lambda: graphs["INDIS"](x),
        "indis dpmpp_2m eager (fused)": lambda: indis.sample(net, x, grid, "dpmpp_2m"),
        "indis dpmpp_2m graph (fused)": lambda: graphs["2m"](x, grid, validate=False),
        "diffusers DPM++(2M) loop": diffusers_loop(net, x),
        "trivial net: indis dpmpp_2m eager": lambda: indis.sample(trivial, x, grid, "dpmpp_2m"),
        "trivial net: indis dpmpp_2m graph": lambda: graphs["trivial"](x, grid, validate=False),
        "trivial net: diffusers DPM++(2M) loop": diffusers_loop(trivial, x),
    }


def gpu_main(batches: list[int], reps: int) -> dict:
    device, dtype = torch.device("cuda"), torch.bfloat16
    net = unet_sized(device, dtype)
    phi = predictor_for(device)
    params = sum(p.numel() for p in net.parameters())
    trivial = lambda x, sigma, **cond: x * 0.5  # noqa: E731
    grid = indis.get_sigmas("edm", NFE, 0.002, 80.0, device=device)
    results: dict = {"params": params, "shape": list(SHAPE), "dtype": "bfloat16", "nfe": NFE, "rows": {}}
    for bsz in batches:
        x = torch.randn(bsz, *SHAPE, device=device, generator=torch.Generator(device).manual_seed(bsz))
        x = (x * 80.0).to(dtype)
        graphs = {"INDIS": GraphSampler(net, "ipndm", predictor=phi), "2m": GraphSampler(net, "dpmpp_2m"),
                  "trivial": GraphSampler(trivial, "dpmpp_2m")}
        with torch.no_grad():
            methods = build_methods(net, phi, trivial, grid, x, graphs)
            row = {}
            for name, fn in methods.items():
                t = percentiles(time_call(fn, reps))
                t["samples_per_s"] = bsz / t["p50"] * 1e3
                t["ms_per_step"] = t["p50"] / NFE
                row[name] = t
                print(f"B={bsz} {name}: P50 {t['p50']:.3f} ms  P95 {t['p95']:.3f}  P99 {t['p99']:.3f}  "
                      f"{t['samples_per_s']:.1f} samples/s", flush=True)
            row["stages (INDIS eager)"] = stage_latency(net, phi, x, reps)
            assert all(g.captured == 1 for g in graphs.values()), "a replay re-captured"
        results["rows"][str(bsz)] = row
    return results


def report(results: dict) -> None:
    rows = results["rows"]
    batches = list(rows)
    names = [n for n in rows[batches[0]] if not n.startswith("stages")]
    print(f"\n## End to end, NFE {NFE}, UNet {results['params'] / 1e6:.1f} M params, "
          f"x [B, {', '.join(map(str, results['shape']))}] {results['dtype']}\n")
    print("| method | " + " | ".join(f"B={b} P50 / P95 / P99 ms | B={b} samples/s" for b in batches) + " |")
    print("|---" * (1 + 2 * len(batches)) + "|")
    for n in names:
        cells = []
        for b in batches:
            t = rows[b][n]
            cells += [f"{t['p50']:.2f} / {t['p95']:.2f} / {t['p99']:.2f}", f"{t['samples_per_s']:.0f}"]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\n## Per-stage latency of the eager INDIS call (P50 / P99 ms)\n")
    stages = list(rows[batches[0]]["stages (INDIS eager)"])
    print("| stage | " + " | ".join(f"B={b}" for b in batches) + " |")
    print("|---" * (1 + len(batches)) + "|")
    for s in stages:
        per = [rows[b]["stages (INDIS eager)"][s] for b in batches]
        cells = [f"{t['p50']:.3f} / {t['p99']:.3f}" for t in per]
        print(f"| {s} | " + " | ".join(cells) + " |")
    print("\n## Ratios (P50)\n")
    pairs = [("diffusers loop / indis dpmpp_2m graph", "diffusers DPM++(2M) loop",
              "indis dpmpp_2m graph (fused)"),
             ("indis dpmpp_2m eager / graph", "indis dpmpp_2m eager (fused)", "indis dpmpp_2m graph (fused)"),
             ("INDIS eager / graph", "indis INDIS eager (ipndm, fused)", "indis INDIS graph (ipndm, fused)"),
             ("INDIS graph / dpmpp_2m graph (predictor + table cost)", "indis INDIS graph (ipndm, fused)",
              "indis dpmpp_2m graph (fused)"),
             ("trivial net: diffusers / indis graph", "trivial net: diffusers DPM++(2M) loop",
              "trivial net: indis dpmpp_2m graph")]
    print("| ratio | " + " | ".join(f"B={b}" for b in batches) + " |")
    print("|---" * (1 + len(batches)) + "|")
    results["ratios"] = {}
    for label, a, b_ in pairs:
        vals = [rows[b][a]["p50"] / rows[b][b_]["p50"] for b in batches]
        results["ratios"][label] = dict(zip(batches, vals, strict=True))
        print(f"| {label} | " + " | ".join(f"{v:.2f}x" for v in vals) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", default="1,8,64")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if not torch.cuda.is_available():
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
        import bench_host_overhead

        print("No CUDA device: host overhead per step on CPU (bench_host_overhead.py, trivial model).\n")
        host_args = ["--steps", "10", "--repeats", str(max(args.reps, 20)), "--rounds", "4",
                     "--batch-sizes", "1,16"]
        return bench_host_overhead.main(host_args + (["--json", args.json] if args.json else []))
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "python": sys.version.split()[0]}
    print(f"# End-to-end sampling: {env}\n")
    results = gpu_main([int(b) for b in args.batch_sizes.split(",")], args.reps)
    report(results)
    results["env"], results["elapsed_s"] = env, time.perf_counter() - t0
    print(f"\n- {args.reps} timed calls per method after 3 warm-up calls; total {results['elapsed_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
