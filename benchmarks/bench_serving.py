"""Continuous vs static batching on a heterogeneous request stream (mirrors ``engine/serving/batcher.py``).

The project's digits UNet; each ``--nfe`` is one request stream with NFEs drawn uniformly (``3,5,7``) or with
weights (``3:0.54,5:0.42,7:0.04``, e.g. the mix an NFE allocator chose), iPNDM, EDM grids, one seed each,
arriving as a Poisson process at ``--rate`` requests/s (``inf``: all at t = 0, a saturated server). Both
policies use the same :class:`~indis.engine.serving.batcher.ContinuousBatcher` (capacity ``--capacity``):
``continuous`` admits into free slots every iteration; ``static`` waits for a full batch and runs it to its
longest request, as a server without ragged solvers does. Reports samples/s (requests / time from first
arrival to last result), latency P50/P95/P99 (result time - arrival time), the compute spent (denoiser rows
incl. padding per useful row), host time per iteration outside the denoiser, and the max difference between
the two policies' samples (the same per-sample computation, so "equal quality" is checked, not assumed).

Each stream's header gives the ceiling of the saturated ratio: the static policy's iterations (each batch of
``--capacity`` consecutive requests runs to its longest NFE) over the fewest iterations any policy needs
(total NFE / capacity). Where every iteration costs the same (saturated, one bucket -- the default here) the
samples/s ratio cannot exceed it but by noise (one repeat on a shared 2-core machine: about +-10 %). The
policies alternate within each of ``--repeats`` repeats; each policy's row is its median-throughput run, the
ratio line the median of the per-repeat (paired) ratios with their range and the share of the ceiling. Every
repeat's numbers are in the JSON.

``--graphs`` (CUDA) adds a third row, the continuous policy with each bucket's iteration captured as a CUDA
graph (``ContinuousBatcher(graphs=True)``). On CUDA no row times its denoiser apart (that would take a host
sync around every call and slow the eager rows, which the graph row would not pay), so there "host ms /
iteration" is the whole iteration's wall time and "denoiser ms / iteration" is not measured (-). On CUDA
every policy delivers a result one iteration after its retirement (no host sync in the loop), so a result
is ready when its future is done.

Run:  python benchmarks/bench_serving.py [--requests 1024] [--capacity 32] [--nfe 3,5,7 ...]
      [--rate inf,300,600] [--device cuda --graphs]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from indis.engine.serving.batcher import ContinuousBatcher, Request
from indis.engine.testbeds.digits import load_backbone


class Timed:
    """Wraps a CPU denoiser and accumulates its wall time (so host time per iteration can be separated)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net, self.seconds = net, 0.0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.net(x, sigma)
        self.seconds += time.perf_counter() - t0
        return out


def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f}"


def parse_mix(spec: str) -> tuple[list[int], list[float]]:
    """``3,5,7`` (uniform) or ``3:0.6,5:0.2,7:0.2`` -> NFEs and normalised weights."""
    nfes, weights = [], []
    for part in spec.split(","):
        nfe, _, weight = part.partition(":")
        nfes.append(int(nfe))
        weights.append(float(weight) if weight else 1.0)
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--nfe {spec!r}: weights must be non-negative with a positive sum")
    return nfes, [w / sum(weights) for w in weights]


def static_ceiling(nfes: list[int], capacity: int) -> float:
    """Static iterations (each batch of ``capacity`` consecutive requests runs to its longest NFE) over the
    fewest iterations of capacity-sized calls that can serve the stream (total NFE / capacity)."""
    static = sum(max(nfes[a:a + capacity]) for a in range(0, len(nfes), capacity))
    return static / (sum(nfes) / capacity)


POLICIES = {"continuous": ("continuous", False), "static": ("static", False),
            "continuous, CUDA graphs": ("continuous", True)}


def serve(name: str, requests: list[Request], arrivals: list[float], capacity: int,
          buckets: tuple[int, ...] | None, device: torch.device) -> dict:
    policy, graphs = POLICIES[name]
    net = load_backbone("unet").to(device)
    model = Timed(net) if device.type == "cpu" else None  # on CUDA timing it apart would need syncs
    batcher = ContinuousBatcher(model or net, (1, 8, 8), capacity=capacity, policy=policy, buckets=buckets,
                                device=device, graphs=graphs)
    batcher.run_all(requests[:capacity])  # warm-up (allocator, first calls, the graphs' capture)
    if model is not None:
        model.seconds = 0.0
    batcher.stats = dict.fromkeys(batcher.stats, 0)
    done_at: dict[int, float] = {}
    futures: list = []
    t0 = time.perf_counter()
    loop_s, i = 0.0, 0
    with torch.no_grad():
        while len(done_at) < len(requests):
            now = time.perf_counter() - t0
            while i < len(requests) and arrivals[i] <= now:
                futures.append(batcher.submit(requests[i]))
                i += 1
            t_it = time.perf_counter()
            n = batcher.iterate(flush=i == len(requests))
            loop_s += time.perf_counter() - t_it
            stamp = time.perf_counter() - t0
            for k, f in enumerate(futures):
                if k not in done_at and f.done():
                    done_at[k] = stamp
            if n == 0 and i < len(requests):
                time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
    lat = sorted(done_at[k] - arrivals[k] for k in done_at)
    span = max(done_at.values()) - arrivals[0]
    st = batcher.stats
    denoiser_s = model.seconds if model is not None else 0.0

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, round(p * (len(lat) - 1)))] * 1e3

    return {"samples_per_s": len(requests) / span, "p50_ms": statistics.median(lat) * 1e3, "p95_ms": q(0.95),
            "p99_ms": q(0.99), "iterations": st["iterations"], "rows_per_useful_row":
            st["padded_steps"] / st["slot_steps"], "host_ms_per_iteration":
            (loop_s - denoiser_s) / st["iterations"] * 1e3, "denoiser_ms_per_iteration":
            None if model is None else denoiser_s / st["iterations"] * 1e3,
            "results": [f.result().cpu() for f in futures]}


# The NFE shares the allocator on x_T chose at an average budget of 4 NFE on the digits UNet
# (benchmarks/results/allocation/digits-unet.md, `python -m indis.engine.studies.allocation`): the request
# stream an NFE-allocating server sees.
ALLOCATOR_BUDGET_4 = "3:0.55,5:0.41,7:0.05"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1024)
    ap.add_argument("--capacity", type=int, default=32)
    ap.add_argument("--nfe", action="append", help="an NFE mix, drawn uniformly (3,5,7) or with weights "
                    f"(3:0.6,5:0.2,7:0.2); repeat for several streams (default: 3,5,7 and "
                    f"{ALLOCATOR_BUDGET_4}, the x_T allocator's mix at budget 4)")
    ap.add_argument("--rate", default="inf,300,600", help="Poisson arrival rates (requests/s), comma list")
    ap.add_argument("--repeats", type=int, default=5, help="runs per policy (alternating); median shown")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--buckets", default=None, help="batch-size buckets, e.g. 8,16,32 (default: the capacity "
                    "only -- on CPU a changing batch shape costs oneDNN more than the padding saves)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--graphs", action="store_true", help="also the continuous policy with CUDA graphs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.graphs and args.device == "cpu":
        ap.error("--graphs needs --device cuda (a CPU pool steps with its C++ or torch call)")
    names = [*POLICIES] if args.graphs else ["continuous", "static"]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = {"torch": torch.__version__, "threads": args.threads, "python": sys.version.split()[0],
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    out: dict = {"env": env, "args": vars(args), "streams": []}
    buckets = tuple(int(b) for b in args.buckets.split(",")) if args.buckets else (args.capacity,)
    print(f"# Continuous vs static batching: digits UNet, iPNDM, EDM grids, {args.requests} requests per "
          "stream, "
          f"capacity {args.capacity}, {env['device']}, {args.threads} threads")
    for spec in args.nfe or ["3,5,7", ALLOCATOR_BUDGET_4]:
        nfes, weights = parse_mix(spec)
        g = torch.Generator().manual_seed(0)
        picks = torch.multinomial(torch.tensor(weights), args.requests, True, generator=g).tolist()
        requests = [Request(seed=k, nfe=nfes[p], solver="ipndm", schedule="edm") for k, p in enumerate(picks)]
        ceiling = static_ceiling([r.nfe for r in requests], args.capacity)
        mix = ", ".join(f"{n}: {w:.2f}" for n, w in zip(nfes, weights, strict=True))
        print(f"\n## NFE shares {{{mix}}} (drawn mean {statistics.mean(r.nfe for r in requests):.2f})\n\n"
              f"Ceiling of the saturated samples/s ratio (static iterations / (total NFE / capacity)): "
              f"{ceiling:.2f}x\n")
        print("| arrivals | policy | samples/s | P50 / P95 / P99 latency ms | denoiser rows per useful row | "
              "iterations | host ms / iteration | denoiser ms / iteration |\n" + "|---" * 8 + "|")
        stream: dict = {"nfe": nfes, "weights": weights, "ceiling": ceiling, "runs": {}}
        for rate_s in args.rate.split(","):
            rate = float(rate_s)
            gaps = torch.empty(args.requests).exponential_(generator=g).tolist()
            arrivals = [0.0] * args.requests if math.isinf(rate) else list(
                torch.tensor(gaps).div(rate).cumsum(0).sub(gaps[0] / rate).tolist())
            tries: dict[str, list[dict]] = {p: [] for p in names}
            for _ in range(args.repeats):  # alternating, so a slow spell of a shared machine hits both
                for p, got in tries.items():
                    got.append(serve(p, requests, arrivals, args.capacity, buckets, device))
            runs = {p: sorted(got, key=lambda r: r["samples_per_s"])[(len(got) - 1) // 2]
                    for p, got in tries.items()}
            label = "all at t=0" if math.isinf(rate) else f"Poisson {rate:g}/s"
            for p, r in runs.items():
                print(f"| {label} | {p} | {r['samples_per_s']:.0f} | {r['p50_ms']:.0f} / {r['p95_ms']:.0f} / "
                      f"{r['p99_ms']:.0f} | {r['rows_per_useful_row']:.2f} | {r['iterations']} | "
                      f"{r['host_ms_per_iteration']:.2f} | {fmt_ms(r['denoiser_ms_per_iteration'])} |",
                      flush=True)
            static = runs["static"].pop("results")
            entry: dict = {}
            for p in names[:1] + names[2:]:  # each other policy against static
                paired = [c["samples_per_s"] / s["samples_per_s"]
                          for c, s in zip(tries[p], tries["static"], strict=True)]
                diff = max(float((a - b).abs().max())
                           for a, b in zip(runs[p].pop("results"), static, strict=True))
                ratio = statistics.median(paired)
                share = f"; {ratio / ceiling:.0%} of the ceiling" if math.isinf(rate) else ""
                print(f"| {label} | {p} / static | {ratio:.2f}x ({min(paired):.2f}-{max(paired):.2f}"
                      f"{share}) | | | | | max sample difference {diff:.1e} |")
                entry[p] = {"throughput_ratio": ratio, "paired_ratios": paired, "max_sample_difference": diff}
            spread = {p: [{k: v for k, v in r.items() if k != "results"} for r in got]
                      for p, got in tries.items()}
            stream["runs"][label] = {**runs, "throughput_ratio": entry["continuous"]["throughput_ratio"],
                                     "paired_ratios": entry["continuous"]["paired_ratios"],
                                     "max_sample_difference": entry["continuous"]["max_sample_difference"],
                                     "against_static": entry, "every_repeat": spread}
        out["streams"].append(stream)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
