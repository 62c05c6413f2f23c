"""CPU benchmark of the C++ fused ragged step (``indis_native``) against the torch reference and a copy.

For each (threads, batch, solver) -- float32 samples of 4x32x32, every sample on its own random grid at its
own random stage (``bench_ragged_step.ragged_case``) -- one step is timed three ways:

* ``native``: ``indis.kernels.native.ragged_step_native`` (one pass, threaded over samples and chunks);
* ``torch eager``: ``ragged_step_torch``, the readable reference;
* ``copy``: ``dst.copy_(src)`` of the same number of bytes (``nbytes / 2`` read, ``nbytes / 2`` written).

Bytes moved are ``bench_ragged_step.bytes_moved`` (inputs whose coefficients are zero are not read). Buffers
rotate over independent sets as in ``bench_ragged_step`` (up to 16 sets, within 512 MB), so the larger
configs run from DRAM rather than cache. ``torch.set_num_threads`` and the native thread count are set
together. Build the extension first: ``.ci/build_native.sh``.

Run:  python benchmarks/bench_native_step.py [--reps N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from indis.kernels import native
from indis.kernels.ragged_step import ragged_step_torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ragged_step import WORKING_SET, buffer_sets, bytes_moved, ragged_case, time_calls  # noqa: E402

SOLVERS = ("dpmpp_2m", "ipndm", "unipc")
BATCHES = (16, 64)
THREADS = (1, 2)
SHAPE = (4, 32, 32)
PATHS = ("native", "torch eager", "copy")


def run_config(threads: int, bsz: int, solver: str, reps: int, inner: int) -> dict:
    """Times (µs per step, median of ``reps`` means of ``inner`` calls) and GB/s of the three paths."""
    cpu, dtype = torch.device("cpu"), torch.float32
    torch.set_num_threads(threads)
    table, step = ragged_case(solver, bsz, cpu, dtype)
    nbytes = bytes_moved(table, step, SHAPE[0] * SHAPE[1] * SHAPE[2], 4)
    sets = max(1, min(16, WORKING_SET // nbytes))
    bufs = buffer_sets(table, bsz, SHAPE, dtype, cpu, sets)
    half = nbytes // 2 // 4
    copies = [(torch.empty(half), torch.randn(half)) for _ in range(sets)]
    paths = {
        "native": lambda i: native.ragged_step_native(*bufs[i % sets], table, step, threads=threads),
        "torch eager": lambda i: ragged_step_torch(*bufs[i % sets], table, step),
        "copy": lambda i: copies[i % sets][0].copy_(copies[i % sets][1]),
    }
    res = {"threads": threads, "batch": bsz, "shape": list(SHAPE), "solver": solver, "history": table.history,
           "stash": table.uses_stash, "bytes": nbytes, "buffer_sets": sets,
           "stages_in_mix": sorted(set(step.tolist()))}
    for name, fn in paths.items():
        t = time_calls(fn, cpu, reps, inner)
        res[name] = {"us_p50": statistics.median(t), "us_min": min(t),
                     "GBps": nbytes / statistics.median(t) / 1e3}
    res["speedup_vs_eager"] = res["torch eager"]["us_p50"] / res["native"]["us_p50"]
    res["native_vs_copy"] = res["native"]["GBps"] / res["copy"]["GBps"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--inner", type=int, default=10, help="back-to-back calls per timed sample")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    if not native.available():
        print(f"indis_native unavailable: {native.REASON}", file=sys.stderr)
        return 1
    import indis_native

    env = {"device": "cpu", "cpus": torch.get_num_threads(), "torch": torch.__version__,
           "python": sys.version.split()[0], "native_threading": indis_native.THREADING}
    print(f"# Native fused ragged step (CPU): {env}\n")
    results = []
    t_start = time.perf_counter()
    for threads in THREADS:
        for bsz in BATCHES:
            for solver in SOLVERS:
                results.append(run_config(threads, bsz, solver, args.reps, args.inner))
                r = results[-1]
                print(f"threads={threads} B={bsz} {solver}: " + ", ".join(
                    f"{p} {r[p]['us_p50']:.1f} us" for p in PATHS), flush=True)
    print("\n| threads | B | solver | MB moved | native µs | eager µs | copy µs | native GB/s | eager GB/s "
          "| copy GB/s | native / eager speedup | native % of copy |")
    print("|---" * 12 + "|")
    for r in results:
        print(f"| {r['threads']} | {r['batch']} | {r['solver']} | {r['bytes'] / 1e6:.2f} | "
              + " | ".join(f"{r[p]['us_p50']:.1f}" for p in PATHS) + " | "
              + " | ".join(f"{r[p]['GBps']:.1f}" for p in PATHS)
              + f" | {r['speedup_vs_eager']:.1f}x | {100 * r['native_vs_copy']:.0f} % |")
    elapsed = time.perf_counter() - t_start
    print(f"\n- sample {'x'.join(map(str, SHAPE))} float32; medians of {args.reps} samples, each the mean of "
          f"{args.inner} back-to-back calls on rotating buffers; total {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "results": results, "elapsed_s": elapsed}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
