"""Host time per iteration of ``ContinuousBatcher.iterate()`` on CPU: the C++ calls vs their torch twins.

A trivial denoiser (``x * 0.5``) leaves only the batcher's own work: admission, the denoiser call's
plumbing, the fused step and the slot bookkeeping, and retirement. Backend ``native``: the pool's C++ calls
(``indis.kernels.native``: the network times, the step with the counters' advance, a retirement's copies
and finiteness flags, the compaction with the freed slots' reset); backend ``torch``: their torch twins (and
numpy views for the bookkeeping). A saturated
stream of ``--requests`` requests (NFE drawn from 3, 5, 7; iPNDM; EDM grids; one seed each) is served at
capacity 32 and 64, samples ``(1, 8, 8)``; each iteration is timed alone, the median over ``--reps`` runs of
the stream is reported (backends interleaved). A second table splits that cost: the median iteration of a
full pool that neither admits nor retires (``capacity`` requests of NFE 16), and the first and last
iterations of that run (all ``capacity`` admitted, all retired) per request. The streams run under
``torch.no_grad()``, as a server's loop does (``iterate`` called with grad on adds a no-grad block per call).
Build the extension first: ``.ci/build_native.sh``.

Run:  python benchmarks/bench_batcher_host.py [--requests 512] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch

from indis.engine.serving.batcher import ContinuousBatcher, Request
from indis.kernels import native

CAPACITIES = (32, 64)
BACKENDS = ("native", "torch")
SHAPE = (1, 8, 8)


def trivial(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A denoiser that costs next to nothing."""
    return x * 0.5


def stream(count: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    return [Request(seed=i, nfe=rng.choice((3, 5, 7)), solver="ipndm", schedule="edm") for i in range(count)]


def iteration_times(batcher: ContinuousBatcher, requests: list[Request]) -> list[float]:
    """Serve ``requests`` (all queued at once); µs of each ``iterate()`` call."""
    for r in requests:
        batcher.submit(r)
    out = []
    while batcher.pending():
        t0 = time.perf_counter()
        batcher.iterate(flush=True)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def split_times(batcher: ContinuousBatcher, capacity: int, reps: int) -> dict[str, float]:
    """µs of a full pool's step alone, and per request of admitting and of retiring ``capacity`` at once."""
    steady, admit, retire = [], [], []
    for rep in range(reps + 1):
        times = iteration_times(batcher, [Request(seed=i, nfe=16, schedule="edm") for i in range(capacity)])
        if rep:  # the first run warms up
            steady += times[1:-1]
            admit.append(times[0] - statistics.median(times[1:-1]))
            retire.append(times[-1] - statistics.median(times[1:-1]))
    return {"step_only_us": statistics.median(steady),
            "admit_us_per_request": statistics.median(admit) / capacity,
            "retire_us_per_request": statistics.median(retire) / capacity}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5, help="runs of the whole stream per configuration")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    if not native.available():
        print(f"indis_native unavailable: {native.REASON}", file=sys.stderr)
        return 1
    requests = stream(args.requests)
    rows = []
    with torch.no_grad():
        for capacity in CAPACITIES:
            batchers = {b: ContinuousBatcher(trivial, SHAPE, capacity=capacity, backend=b) for b in BACKENDS}
            times: dict[str, list[float]] = {b: [] for b in BACKENDS}
            for b in BACKENDS:  # warm-up: allocator, cached tables
                iteration_times(batchers[b], requests[:2 * capacity])
            for _ in range(args.reps):
                for b in BACKENDS:
                    times[b] += iteration_times(batchers[b], requests)
            p50 = {b: statistics.median(t) for b, t in times.items()}
            rows.append({"capacity": capacity, "iterations": len(times["native"]) // args.reps,
                         **{f"{b}_us_p50": p50[b] for b in BACKENDS},
                         **{f"{b}_us_mean": statistics.fmean(times[b]) for b in BACKENDS},
                         "torch_over_native": p50["torch"] / p50["native"],
                         "split": {b: split_times(batchers[b], capacity, args.reps) for b in BACKENDS}})
    env = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "requests": args.requests, "reps": args.reps, "shape": list(SHAPE), "solver": "ipndm",
           "schedule": "edm", "nfe": [3, 5, 7]}
    print(f"host time per iterate() (µs, median), {args.requests} requests, {env['threads']} threads\n")
    print("| capacity | iterations | native (C++ calls) | torch (twins) | torch / native |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['capacity']} | {r['iterations']} | {r['native_us_p50']:.1f} | {r['torch_us_p50']:.1f} | "
              f"{r['torch_over_native']:.2f}x |")
    print("\nwhere it goes: a full pool's iteration that neither admits nor retires (µs), and per request "
          "the extra time of admitting / retiring a whole pool at once (µs)\n")
    print("| capacity | backend | step only | admit, per request | retire, per request |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        for b in BACKENDS:
            s = r["split"][b]
            print(f"| {r['capacity']} | {b} | {s['step_only_us']:.1f} | {s['admit_us_per_request']:.1f} | "
                  f"{s['retire_us_per_request']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
