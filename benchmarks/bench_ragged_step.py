"""Kernel benchmark of the fused ragged step (mirrors ``kernels/ragged_step.py``).

For each (batch, sample shape, dtype, solver) it builds a random ragged batch -- every sample on its own
random EDM-like grid, at its own random stage -- and times one step three ways:

* ``triton``: ``ragged_step_triton`` (one launch, any mix of stages);
* ``torch eager``: ``ragged_step_torch``, the readable reference (gather, combine, mask);
* ``torch.compile``: the same reference through ``torch.compile`` (GPU only, one config -- the large bf16
  UniPC step -- since each compile takes tens of seconds).

Bytes moved are counted exactly from the gathered coefficient rows: per active sample, the state and the raw
output are read, the stash and each history slot only where its coefficient is nonzero (the kernel skips the
others), the state, the stash (where written) and one history slot are written. The copy baseline is a
device-to-device ``copy_`` of the same number of bytes (half read, half written); "% of copy" is the
kernel's bytes/s over the copy's. Buffers rotate over enough independent sets that the working set exceeds
the L2 cache.
CUDA kernels per call are counted with the torch profiler. On CPU only the torch path runs (µs per call).

Run:  python benchmarks/bench_ragged_step.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

import indis
from indis.engine.core.sampling import prepare
from indis.kernels.ragged_step import PackedTable, launch_config, ragged_step_torch, ragged_step_triton

SOLVERS = {"dpmpp_2m": {}, "ipndm": {}, "unipc": {"variant": "bh2", "order": 2}}
STEPS = 10
WORKING_SET = 512 << 20  # bytes touched per rotation: well above any L2 (50 MB H100, 60 MB H200)


def identity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x


def ragged_case(solver: str, bsz: int, device: torch.device, dtype: torch.dtype, seed: int = 0
                ) -> tuple[PackedTable, torch.Tensor]:
    """Packed table over random per-sample grids and a random stage per sample."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(bsz, STEPS + 1, generator=g, dtype=torch.float64)
    grids = indis.grid_from_logits(logits, 0.002, 80.0).to(device)
    x = torch.zeros(bsz, 1, device=device, dtype=dtype)
    plan = prepare(identity, x, grids, solver, **SOLVERS[solver])
    stages = plan.packed.stages
    step = torch.randint(0, stages, (bsz,), generator=g, dtype=torch.int32).to(device)
    return plan.packed, step


def bytes_moved(table: PackedTable, step: torch.Tensor, numel: int, itemsize: int) -> int:
    """Exact bytes the kernel reads and writes for this mix (host-side, from the gathered rows)."""
    rows = table.rows[torch.arange(step.shape[0], device=step.device), step.long()].cpu()
    w, k = table.width, table.history
    total = 0
    for r in rows:
        coef_y, coef_s = r[2:2 + w], r[2 + w:]
        reads = 2  # state, raw
        reads += int(table.uses_stash and bool(coef_y[1] != 0 or coef_s[1] != 0))
        reads += sum(int(bool(coef_y[3 + j] != 0 or (table.uses_stash and coef_s[3 + j] != 0)))
                     for j in range(k))
        writes = 1 + int(table.uses_stash and bool(coef_s.abs().sum() != 0)) + int(k > 0)
        total += (reads + writes) * numel * itemsize
    return total


def buffer_sets(table: PackedTable, bsz: int, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device, count: int) -> list[tuple]:
    g = torch.Generator(device=device).manual_seed(1)

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)

    return [(rnd(bsz, *shape), rnd(bsz, *shape), rnd(bsz, *shape) if table.uses_stash else None,
             rnd(table.history, bsz, *shape) if table.history else None) for _ in range(count)]


def time_calls(fn: Callable[[int], object], device: torch.device, reps: int, inner: int) -> list[float]:
    """Per-call times (µs) as the host issues them: ``reps`` samples, each the mean of ``inner`` calls.

    On a GPU these include the launch cost of every call (a host-bound loop shows the host's rate, not the
    kernel's); :func:`time_device` measures the device time.
    """
    for i in range(3):
        fn(i)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(inner):
                fn(i)
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1e3 / inner)
        else:
            t0 = time.perf_counter_ns()
            for i in range(inner):
                fn(i)
            out.append((time.perf_counter_ns() - t0) / 1e3 / inner)
    return out


def time_device(fn: Callable[[int], object], reps: int, inner: int) -> list[float] | None:
    """Device µs per call: ``inner`` calls (rotating buffers) captured in one CUDA graph, replays timed with
    events -- launch gaps vanish, so this is the kernels' own time. None if the calls cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(inner):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(inner):
                fn(i)
    except RuntimeError as e:
        print(f"  (not capturable: {str(e).splitlines()[0][:100]})")
        return None
    graph.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3 / inner)
    return out


def count_kernels(fn: Callable[[], object]) -> int:
    """CUDA kernels launched by one call (torch profiler), memcpy/memset included."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def run_config(bsz: int, shape: tuple[int, ...], dtype: torch.dtype, solver: str, device: torch.device,
               compile_ref: bool, reps: int) -> dict:
    table, step = ragged_case(solver, bsz, device, dtype)
    numel = int(torch.tensor(shape).prod())
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = bytes_moved(table, step, numel, itemsize)
    sets = max(1, min(16, WORKING_SET // max(nbytes, 1)))
    bufs = buffer_sets(table, bsz, shape, dtype, device, sets)
    res = {"batch": bsz, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "solver": solver,
           "history": table.history, "stash": table.uses_stash, "bytes": nbytes, "buffer_sets": sets,
           "stages_in_mix": sorted(set(step.tolist()))}

    def call(fn: Callable) -> Callable[[int], object]:
        return lambda i: fn(*bufs[i % sets], table, step)

    paths: dict[str, Callable[[int], object]] = {"torch eager": call(ragged_step_torch)}
    if device.type == "cuda":
        paths["triton"] = call(ragged_step_triton)
        half = nbytes // 2 // itemsize
        copies = [(torch.empty(half, dtype=dtype, device=device), torch.randn(half, device=device).to(dtype))
                  for _ in range(max(1, min(16, WORKING_SET // max(nbytes, 1))))]
        paths["d2d copy (same bytes)"] = lambda i: copies[i % len(copies)][0].copy_(
            copies[i % len(copies)][1])
        if compile_ref:
            compiled = torch.compile(ragged_step_torch, dynamic=False)
            t0 = time.perf_counter()
            compiled(*bufs[0], table, step)
            torch.cuda.synchronize()
            res["compile_s"] = time.perf_counter() - t0
            paths["torch.compile"] = call(compiled)
    inner = 20 if device.type == "cuda" else 3
    for name, fn in paths.items():
        t = time_calls(fn, device, reps, inner)
        res[name] = {"us_p50": statistics.median(t), "us_min": min(t)}
        if device.type == "cuda":
            dev = time_device(fn, reps, inner)
            if dev is not None:
                res[name]["device_us_p50"] = statistics.median(dev)
                res[name]["GBps"] = nbytes / res[name]["device_us_p50"] / 1e3
            if name != "d2d copy (same bytes)":
                res[name]["kernels_per_call"] = count_kernels(lambda fn=fn: fn(0))
        else:
            res[name]["GBps"] = nbytes / res[name]["us_p50"] / 1e3
    if device.type == "cuda":
        res["triton_vs_copy"] = res["triton"]["GBps"] / res["d2d copy (same bytes)"]["GBps"]
        # the same kernel for a different mix of stages: still one launch
        step2 = torch.randint(0, table.stages, step.shape, device=device, dtype=step.dtype)
        res["triton_kernels_other_mix"] = count_kernels(lambda: ragged_step_triton(*bufs[0], table, step2))
    return res


def block_sweep(bsz: int, shape: tuple[int, ...], dtype: torch.dtype, solver: str, reps: int) -> list[dict]:
    """Device time of the triton step for each (BLOCK, num_warps): checks the default launch config."""
    device = torch.device("cuda")
    table, step = ragged_case(solver, bsz, device, dtype)
    numel = int(torch.tensor(shape).prod())
    nbytes = bytes_moved(table, step, numel, torch.empty((), dtype=dtype).element_size())
    sets = max(1, min(16, WORKING_SET // max(nbytes, 1)))
    bufs = buffer_sets(table, bsz, shape, dtype, device, sets)
    out = []
    for block in (512, 1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            if block // (32 * warps) < 1:
                continue
            def call(i: int, b: int = block, w: int = warps) -> None:
                ragged_step_triton(*bufs[i % sets], table, step, b, w)

            t = time_device(call, reps, 20)
            if t is not None:
                out.append({"block": block, "num_warps": warps, "device_us_p50": statistics.median(t),
                            "GBps": nbytes / statistics.median(t) / 1e3})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer configs and repeats")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        configs = [(64, (4, 128, 128)), (8, (4, 64, 64))]
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
    else:
        torch.set_num_threads(1)
        configs = [(8, (4, 32, 32))]
        dtypes = [torch.float32, torch.bfloat16]
    if args.quick:
        configs, dtypes = configs[:1], dtypes[:2]
    env = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "python": sys.version.split()[0]}
    if cuda:
        import triton

        env["triton"] = triton.__version__
    print(f"# Fused ragged step: {env}\n")
    results = []
    t_start = time.perf_counter()
    for bsz, shape in configs:
        for dtype in dtypes:
            for solver in SOLVERS:
                compile_ref = (cuda and not args.no_compile and bsz == configs[0][0]
                               and dtype == torch.bfloat16 and solver == "unipc")  # one compile: ~30 s
                results.append(run_config(bsz, shape, dtype, solver, device, compile_ref, args.reps))
                r = results[-1]
                print(f"B={bsz} {shape} {r['dtype']} {solver}: " + ", ".join(
                    f"{k} {v['us_p50']:.1f} us" for k, v in r.items() if isinstance(v, dict)), flush=True)
    paths = ["triton", "torch eager", "torch.compile", "d2d copy (same bytes)"] if cuda else ["torch eager"]
    if cuda:
        print("\nDevice time per step (CUDA-graph replay of 20 calls, median); host-issued call time in "
              "brackets (includes each call's launch cost)\n")
    print("| B | sample shape | dtype | solver | MB moved | " + " | ".join(f"{p} µs" for p in paths)
          + (" | triton GB/s | % of copy | kernels/call triton / eager / compile |" if cuda else " | GB/s |"))
    print("|---" * (5 + len(paths) + (3 if cuda else 1)) + "|")

    def cell(r: dict, p: str) -> str:
        if p not in r:
            return "-"
        if not cuda:
            return f"{r[p]['us_p50']:.1f}"
        dev = f"{r[p]['device_us_p50']:.1f}" if "device_us_p50" in r[p] else "n/a"
        return f"{dev} ({r[p]['us_p50']:.0f})"

    for r in results:
        row = f"| {r['batch']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['solver']} | " \
              f"{r['bytes'] / 1e6:.1f} | " + " | ".join(cell(r, p) for p in paths)
        if cuda:
            kern = " / ".join(str(r[p]["kernels_per_call"]) if p in r else "-"
                              for p in ("triton", "torch eager", "torch.compile"))
            row += f" | {r['triton']['GBps']:.0f} | {100 * r['triton_vs_copy']:.0f} % | {kern} |"
        else:
            row += f" | {r['torch eager']['GBps']:.1f} |"
        print(row)
    sweeps: list[dict] = []
    if cuda and not args.quick:
        default = launch_config(int(torch.tensor(configs[0][1]).prod()))
        print(f"\nLaunch-config sweep (B={configs[0][0]}, {configs[0][1]}, ipndm; default BLOCK, num_warps = "
              f"{default}):\n")
        print("| dtype | BLOCK | num_warps | device µs | GB/s |\n|---|---|---|---|---|")
        for dtype in (torch.float32, torch.bfloat16):
            sweep = block_sweep(configs[0][0], configs[0][1], dtype, "ipndm", args.reps)
            sweeps.append({"dtype": str(dtype).replace("torch.", ""), "configs": sweep})
            for c in sweep:
                print(f"| {str(dtype).replace('torch.', '')} | {c['block']} | {c['num_warps']} | "
                      f"{c['device_us_p50']:.1f} | {c['GBps']:.0f} |")
    elapsed = time.perf_counter() - t_start
    print(f"\n- medians of {args.reps} samples, each the mean of {20 if cuda else 3} back-to-back calls on "
          f"rotating buffers; total {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "results": results, "sweeps": sweeps, "elapsed_s": elapsed}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
