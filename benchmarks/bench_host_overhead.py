"""Host-overhead benchmark: microseconds per sampling step with a trivial model, indis vs diffusers.

Measures, in ONE process and under the same settings, the Python/dispatch cost of a multistep sampling loop
when the network is trivial (``x * 0.5``), at shape ``[B, 3, 32, 32]`` float32 on CPU:

* ``diffusers DPM++(2M) step()`` -- ``DPMSolverMultistepScheduler(solver_order=2)``, the user loop
  ``for t in sched.timesteps: out = model(x, t); x = sched.step(out, t, x).prev_sample``;
* ``diffusers UniPC(bh2) step()`` -- ``UniPCMultistepScheduler(solver_order=2, solver_type="bh2")``, same;
* ``bare torch DPM++(2M)`` -- k-diffusion's multistep DPM++(2M) with every coefficient precomputed as a
  Python float (the floor: one model call plus 2-3 tensor ops per step);
* ``indis run_table`` -- the sampling loop only (table and per-stage views prebuilt by ``indis.prepare``),
  for dpmpp_2m, unipc (bh2, order 2) and ipndm, with a shared ``[N+1]`` grid and a ragged ``[B, N+1]`` grid;
* ``indis.sample`` and ``indis.prepare`` -- end to end (validation + table build + loop) and the set-up
  alone, for every solver on the shared grid (dpmpp_2m and unipc also on the ragged grid), each with the
  plan cache kept and emptied ("cold"); a per-solver table at the end sums them up.

µs/step = median over repeats of (whole-loop wall time / steps); warm-up runs are discarded. Nothing is
subtracted: the trivial model's cost is inside every loop equally. diffusers' ``set_timesteps`` and
indis' ``prepare`` (per-generation fixed costs) are reported separately, per call (measured hot, back to
back, so they are lower bounds for a once-per-generation call). ``prepare`` keeps validated tables by value,
so a repeated call with the same grid reuses its table; the rows marked "cold" empty that cache before
every call, which is what a call with a new grid (e.g. an INDIS predictor's per-sample schedules) pays.
Each method is timed in hot back-to-back blocks; the blocks alternate over several rounds so that clock or
thermal drift hits each one equally.

Run:  python benchmarks/bench_host_overhead.py [--steps 10] [--repeats 300] [--batch-sizes 1,16,64]
      [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

import indis
from indis.engine.core.sampling import clear_plan_cache, run_table
from indis.engine.core.solvers import SOLVERS

SHAPE = (3, 32, 32)
BARE = "bare torch DPM++(2M) loop (Python-float coefs)"
DIFFUSERS = ("dpmpp_2m", "unipc")  # the solvers compared with a diffusers scheduler


# ----------------------------------------------------------------------------------------------- models
def kd_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Trivial k-diffusion denoiser (x0 prediction): ``D(x; sigma) = x * 0.5``."""
    return x * 0.5


def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Trivial diffusers epsilon model: ``eps(x, t) = x * 0.5``."""
    return x * 0.5


# ------------------------------------------------------------------------------------ bare torch floor
def bare_dpmpp_2m_coefs(sigmas: list[float]) -> list[tuple[float, float, float]]:
    """k-diffusion ``sample_dpmpp_2m`` as per-step Python floats: ``x' = a x + b D + c D_prev``.

    With t = -log(sigma), h = t' - t: first step (or a step to sigma = 0) is
    ``x' = (sigma'/sigma) x - expm1(-h) D``; later steps use ``D_d = (1 + 1/(2r)) D - 1/(2r) D_prev``,
    r = h_last / h.
    """
    out = []
    for i in range(len(sigmas) - 1):
        s, s1 = sigmas[i], sigmas[i + 1]
        ratio = s1 / s
        if s1 == 0:
            out.append((0.0, 1.0, 0.0))
            continue
        h = math.log(s) - math.log(s1)
        em = -math.expm1(-h)
        if i == 0:
            out.append((ratio, em, 0.0))
        else:
            h_last = math.log(sigmas[i - 1]) - math.log(s)
            half_inv_r = h / (2 * h_last)
            out.append((ratio, em * (1 + half_inv_r), -em * half_inv_r))
    return out


def bare_dpmpp_2m(model: Callable, x: torch.Tensor, sigma_in: list[torch.Tensor],
                  coefs: list[tuple[float | torch.Tensor, float, float]]) -> torch.Tensor:
    """Minimal-op DPM++(2M) loop: ``x' = a x + b D + c D_prev`` as one multiply and one or two ``add_``.

    Sigma tensors and coefficients are prepared by the caller; ``a`` may be a Python float or a 0-dim
    tensor (on CPU, multiplying by a Python float dispatches through a wrapped-scalar path that costs
    more than a 0-dim tensor operand, so both are timed).
    """
    old = None
    for sig, (a, b, c) in zip(sigma_in, coefs, strict=True):
        den = model(x, sig)
        x = (x * a).add_(den, alpha=b)
        if old is not None and c != 0.0:
            x.add_(old, alpha=c)
        old = den
    return x


# --------------------------------------------------------------------------------------------- helpers
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pin_malloc() -> str:
    """Fix glibc's mmap / trim thresholds so [16, 3, 32, 32] buffers (192 KiB) always come from the heap.

    With the default *dynamic* thresholds, whether such a buffer comes from mmap (fresh pages, ~48 page
    faults per allocation) or from the heap depends on the allocation history of the process; in a side
    experiment one B=16 loop ran 1.8x slower for that reason alone. Pinning applies to every method
    equally (``--no-pin-malloc`` keeps the defaults).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 64 << 20) == 1 and libc.mallopt(m_trim_threshold, 256 << 20) == 1
    except (OSError, AttributeError):
        ok = False
    return ("glibc mallopt: M_MMAP_THRESHOLD=64 MiB, M_TRIM_THRESHOLD=256 MiB (pinned)" if ok
            else "mallopt unavailable (not glibc?): allocator defaults")


def ragged_grid(batch: int, steps: int) -> torch.Tensor:
    """``[B, N+1]`` EDM grids whose endpoints differ per sample (row 0 is the shared grid)."""
    rows = []
    for i in range(batch):
        f = i / max(batch - 1, 1)
        rows.append(indis.get_sigmas("edm", steps, 0.002 * (1 + 2 * f), 80.0 * (1 - 0.5 * f)))
    return torch.stack(rows)


class Bench:
    """One measured method: ``fn()`` runs one full loop (or call) and returns its elapsed ns."""

    def __init__(self, name: str, fn: Callable[[], int], per: int, group: str) -> None:
        self.name, self.fn, self.per, self.group = name, fn, per, group
        self.samples: list[float] = []

    def median_us(self) -> float:
        return statistics.median(self.samples) / 1e3 / self.per


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU): every timed region ends with its results ready."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> Callable[[], int]:
    def run() -> int:
        sync(device)
        t0 = time.perf_counter_ns()
        fn()
        sync(device)
        return time.perf_counter_ns() - t0
    return run


def build_benches(batch: int, steps: int, device: torch.device) -> list[Bench]:
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *SHAPE), generator=gen, dtype=torch.float32).to(device)
    shared = indis.get_sigmas("edm", steps, 0.002, 80.0).to(device)
    ragged = ragged_grid(batch, steps).to(device)
    benches: list[Bench] = []

    # (a), (b): diffusers schedulers. set_timesteps is untimed in the loop bench, timed on its own.
    scheds = {
        "diffusers DPM++(2M) step()": DPMSolverMultistepScheduler(solver_order=2),
        "diffusers UniPC(bh2) step()": UniPCMultistepScheduler(solver_order=2, solver_type="bh2"),
    }
    for name, sched in scheds.items():
        def loop(sched=sched) -> int:
            sched.set_timesteps(steps, device=device)
            sync(device)
            t0 = time.perf_counter_ns()
            xt = x
            for t in sched.timesteps:
                out = eps_model(xt, t)
                xt = sched.step(out, t, xt).prev_sample
            sync(device)
            return time.perf_counter_ns() - t0
        benches.append(Bench(name, loop, steps, "loop"))
        benches.append(Bench(name.replace("step()", "set_timesteps()"),
                             timed(lambda sched=sched: sched.set_timesteps(steps, device=device), device), 1,
                             "fixed"))

    # (c): bare torch floor on indis' shared grid.
    sig_list = shared.tolist()
    coefs = bare_dpmpp_2m_coefs(sig_list)
    sigma_in = [torch.full((batch,), s, dtype=torch.float32, device=device) for s in sig_list[:-1]]
    benches.append(Bench(BARE, timed(lambda: bare_dpmpp_2m(kd_model, x, sigma_in, coefs), device), steps,
                         "loop"))
    coefs_t = [(torch.tensor(a, dtype=torch.float32, device=device), b, c) for a, b, c in coefs]
    benches.append(Bench("bare torch DPM++(2M) loop, 0-dim tensor for the multiply",
                         timed(lambda: bare_dpmpp_2m(kd_model, x, sigma_in, coefs_t), device), steps, "loop"))

    # (d): indis loop only, plan (table + per-stage views) prebuilt.
    for grid_name, grid in (("shared", shared), ("ragged", ragged)):
        for solver in ("dpmpp_2m", "unipc", "ipndm"):
            opts = {"variant": "bh2", "order": 2} if solver == "unipc" else {}
            plan = indis.prepare(kd_model, x, grid, solver, **opts)
            benches.append(Bench(f"indis run_table {solver} ({grid_name} grid)",
                                 timed(lambda plan=plan: run_table(plan, x), device), plan.table.nfe, "loop"))
    # (e): indis.sample end to end, and prepare on its own: every solver on the shared grid, the two
    # with a diffusers counterpart also on the ragged one.
    for solver in SOLVERS:
        for grid_name, grid in (("shared", shared), ("ragged", ragged))[:2 if solver in DIFFUSERS else 1]:
            def e2e(grid=grid, solver=solver) -> object:
                return indis.sample(kd_model, x, grid, solver)

            def prep(grid=grid, solver=solver) -> object:
                return indis.prepare(kd_model, x, grid, solver)

            def e2e_cold(grid=grid, solver=solver) -> object:
                clear_plan_cache()
                return indis.sample(kd_model, x, grid, solver)

            def prep_cold(grid=grid, solver=solver) -> object:
                clear_plan_cache()
                return indis.prepare(kd_model, x, grid, solver)

            benches.append(Bench(f"indis.sample {solver} end-to-end ({grid_name} grid)", timed(e2e, device),
                                 steps, "loop"))
            benches.append(Bench(f"indis.sample {solver} end-to-end ({grid_name} grid, cold)",
                                 timed(e2e_cold, device), steps, "loop"))
            benches.append(Bench(f"indis.prepare {solver} ({grid_name} grid)", timed(prep, device), 1,
                                 "fixed"))
            benches.append(Bench(f"indis.prepare {solver} ({grid_name} grid, cold)", timed(prep_cold, device),
                                 1, "fixed"))
    return benches


def measure(benches: list[Bench], warmup: int, repeats: int, rounds: int) -> None:
    """Blocked, hot-loop timing: each round runs every method back to back (``warmup`` untimed runs, then
    ``repeats / rounds`` timed runs); rounds alternate over the methods so slow drift hits all of them.

    Blocks rather than per-run interleaving: interleaving puts diffusers' and ``prepare``'s large Python
    code paths between consecutive runs of a method, which evicts caches and adds order-dependent noise
    (measured here: +20-25% on the small loops, unevenly across methods).
    """
    per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    with torch.no_grad():
        for r, n in enumerate(per_round):
            order = benches if r % 2 == 0 else benches[::-1]
            gc.collect()
            gc.disable()
            try:
                for b in order:
                    for _ in range(warmup):
                        b.fn()
                    b.samples += [b.fn() for _ in range(n)]
            finally:
                gc.enable()


def sanity(batch: int, steps: int, device: torch.device) -> list[str]:
    """Finite outputs, and the bare loop agrees with indis' dpmpp_2m where both use 2nd order."""
    x = torch.randn((batch, *SHAPE), generator=torch.Generator().manual_seed(1)).to(device)
    shared = indis.get_sigmas("edm", steps, 0.002, 80.0).to(device)
    ind = indis.sample(kd_model, x, shared, "dpmpp_2m", lower_order_final=False)
    sig_list = shared.tolist()
    bare = bare_dpmpp_2m(kd_model, x, [torch.full((batch,), s, device=device) for s in sig_list[:-1]],
                         bare_dpmpp_2m_coefs(sig_list))
    err = float((ind - bare).abs().max() / bare.abs().max().clamp_min(1e-30))
    notes = [f"bare-torch vs indis dpmpp_2m (lower_order_final=False) max rel diff: {err:.2e}"]
    if not torch.isfinite(ind).all():
        notes.append("WARNING: indis output not finite")
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    for sched in (DPMSolverMultistepScheduler(solver_order=2),
                  UniPCMultistepScheduler(solver_order=2, solver_type="bh2")):
        sched.set_timesteps(steps, device=device)
        xt = x
        for t in sched.timesteps:
            xt = sched.step(eps_model(xt, t), t, xt).prev_sample
        if not torch.isfinite(xt).all():
            notes.append(f"WARNING: {type(sched).__name__} output not finite (timings may include NaN paths)")
    return notes


# ---------------------------------------------------------------------------------------------- report
def fmt_ratio(num: float, den: float) -> str:
    return f"{num / den:.2f}x"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="sampling steps (NFE for 1-eval solvers)")
    ap.add_argument("--repeats", type=int, default=300, help="timed repeats per method (median)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs per method and round")
    ap.add_argument("--rounds", type=int, default=10, help="rounds over all methods (repeats are split)")
    ap.add_argument("--batch-sizes", default="1,16,64", help="comma-separated batch sizes")
    ap.add_argument("--no-pin-malloc", action="store_true",
                    help="keep glibc's dynamic mmap/trim thresholds (noisier B>1 timings)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU timings end with a synchronize)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]

    malloc_note = "glibc malloc defaults (dynamic mmap/trim thresholds)"
    if not args.no_pin_malloc:
        malloc_note = pin_malloc()
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    import diffusers

    t_start = time.perf_counter()
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
           "indis": indis.__version__, "cpu": cpu_model(), "device": str(device),
           "torch_threads": torch.get_num_threads(),
           "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup, "rounds": args.rounds,
           "shape": list(SHAPE), "dtype": "float32", "grad_mode": "torch.no_grad()", "malloc": malloc_note}
    print("# Host overhead per sampling step (trivial model x * 0.5)\n")
    print(f"- torch {env['torch']}, diffusers {env['diffusers']}, indis {env['indis']}, "
          f"Python {env['python']}")
    print(f"- CPU: {env['cpu']}; torch.set_num_threads(1) -> {env['torch_threads']} thread(s) "
          "(fixed to one for stable timings)")
    if device.type == "cuda":
        print(f"- device: {torch.cuda.get_device_name(device)}; every timed call ends with a synchronize")
    print(f"- x: [B, {', '.join(map(str, SHAPE))}] float32 on {device}, steps={args.steps}, "
          "EDM grid 80 -> 0.002 for indis / bare torch, diffusers' own 1000-step linear-beta VP schedule")
    print(f"- µs/step = median over {args.repeats} repeats of loop time / steps; hot-loop blocks: "
          f"{args.rounds} rounds over all methods, each {args.warmup} untimed warm-up runs then its share of "
          "repeats back to back; time.perf_counter_ns, GC off while timing, under torch.no_grad()")
    print("- nothing subtracted: the trivial model call (one multiply) is inside every loop equally")
    print(f"- allocator: {malloc_note}\n")

    results: dict[int, dict[str, dict]] = {}
    notes: list[str] = []
    for bsz in batches:
        benches = build_benches(bsz, args.steps, device)
        measure(benches, args.warmup, args.repeats, args.rounds)
        results[bsz] = {b.name: {"us": b.median_us(), "per": b.per, "group": b.group,
                                 "min_us": min(b.samples) / 1e3 / b.per} for b in benches}
        notes += [f"B={bsz}: {n}" for n in sanity(bsz, args.steps, device)]
        r = {n: v["us"] for n, v in results[bsz].items()}  # the headline ratios as soon as they exist
        dpm = r["diffusers DPM++(2M) step()"] / r["indis.sample dpmpp_2m end-to-end (shared grid)"]
        uni = r["diffusers UniPC(bh2) step()"] / r["indis.sample unipc end-to-end (shared grid)"]
        print(f"- B={bsz} measured: diffusers loop / indis.sample end to end (shared grid): DPM++(2M) "
              f"{dpm:.2f}x, UniPC {uni:.2f}x", flush=True)  # (a run stopped later keeps them in its log)

    names = list(results[batches[0]])
    loop_names = [n for n in names if results[batches[0]][n]["group"] == "loop"]
    fixed_names = [n for n in names if results[batches[0]][n]["group"] == "fixed"]
    bare = BARE

    def us(bsz: int, name: str) -> float:
        return results[bsz][name]["us"]

    hdr = " | ".join([f"B={b} µs/step" for b in batches] + [f"B={b} vs bare" for b in batches])
    print(f"## µs per step (loop)\n\n| method | {hdr} |")
    print("|---" * (1 + 2 * len(batches)) + "|")
    for n in loop_names:
        cells = [f"{us(b, n):.1f}" for b in batches] + [fmt_ratio(us(b, n), us(b, bare)) for b in batches]
        print(f"| {n} | " + " | ".join(cells) + " |")

    cols = " | ".join(f"B={b}" for b in batches)
    print(f"\n## Per-generation fixed cost (µs per call)\n\n| call | {cols} |")
    print("|---" * (1 + len(batches)) + "|")
    for n in fixed_names:
        print(f"| {n} | " + " | ".join(f"{us(b, n):.1f}" for b in batches) + " |")

    ratios = [
        ("diffusers DPM++(2M) / indis dpmpp_2m (loop)", "diffusers DPM++(2M) step()",
         "indis run_table dpmpp_2m (shared grid)", "target >= 4x"),
        ("diffusers UniPC / indis unipc (loop)", "diffusers UniPC(bh2) step()",
         "indis run_table unipc (shared grid)", "target >= 4x"),
        ("indis dpmpp_2m (loop) / bare torch DPM++(2M)", "indis run_table dpmpp_2m (shared grid)", bare,
         "target <= 1x"),
        ("indis dpmpp_2m ragged (loop) / bare torch DPM++(2M)", "indis run_table dpmpp_2m (ragged grid)",
         bare, "target <= 1x"),
        ("diffusers DPM++(2M) / indis.sample dpmpp_2m (end-to-end)", "diffusers DPM++(2M) step()",
         "indis.sample dpmpp_2m end-to-end (shared grid)", "target >= 4x at B=1, >= 2x at B=16"),
        ("diffusers UniPC / indis.sample unipc (end-to-end)", "diffusers UniPC(bh2) step()",
         "indis.sample unipc end-to-end (shared grid)", "target >= 4x at B=1, >= 2x at B=16"),
        ("diffusers DPM++(2M) / indis.sample dpmpp_2m (end-to-end, cold)", "diffusers DPM++(2M) step()",
         "indis.sample dpmpp_2m end-to-end (shared grid, cold)", "info: every call a new table"),
        ("diffusers UniPC / indis.sample unipc (end-to-end, cold)", "diffusers UniPC(bh2) step()",
         "indis.sample unipc end-to-end (shared grid, cold)", "info: every call a new table"),
        ("indis.prepare dpmpp_2m / diffusers set_timesteps", "indis.prepare dpmpp_2m (shared grid)",
         "diffusers DPM++(2M) set_timesteps()", "target <= 3x at B=16"),
        ("indis.prepare unipc / diffusers set_timesteps", "indis.prepare unipc (shared grid)",
         "diffusers UniPC(bh2) set_timesteps()", "target <= 6x at B=16"),
        ("indis.prepare dpmpp_2m (cold) / diffusers set_timesteps",
         "indis.prepare dpmpp_2m (shared grid, cold)", "diffusers DPM++(2M) set_timesteps()",
         "info: every call a new table"),
        ("indis.prepare unipc (cold) / diffusers set_timesteps", "indis.prepare unipc (shared grid, cold)",
         "diffusers UniPC(bh2) set_timesteps()", "info: every call a new table"),
    ]
    print(f"\n## Ratios\n\n| ratio | {cols} | target |")
    print("|---" * (2 + len(batches)) + "|")
    ratio_json = {}
    for label, num, den, target in ratios:
        vals = [us(b, num) / us(b, den) for b in batches]
        ratio_json[label] = dict(zip(map(str, batches), vals, strict=True))
        print(f"| {label} | " + " | ".join(f"{v:.2f}x" for v in vals) + f" | {target} |")

    print(f"\n## Per solver, shared grid (µs per call; e2e: the whole call, {args.steps} steps)\n")
    heads = [f"prepare B={b} | cold B={b} | e2e B={b} | e2e cold B={b}" for b in batches]
    print("| solver | " + " | ".join(heads) + " |")
    print("|---" * (1 + 4 * len(batches)) + "|")
    for solver in SOLVERS:
        cells = []
        for b in batches:
            cells += [f"{us(b, f'indis.prepare {solver} (shared grid{c})'):.1f}" for c in ("", ", cold")]
            cells += [f"{us(b, f'indis.sample {solver} end-to-end (shared grid{c})') * args.steps:.1f}"
                      for c in ("", ", cold")]
        print(f"| {solver} | " + " | ".join(cells) + " |")

    print("\n" + "\n".join(f"- {n}" for n in notes))
    elapsed = time.perf_counter() - t_start
    print(f"- total benchmark time: {elapsed:.1f} s")

    if args.json:
        payload = {"env": env, "results": {str(b): r for b, r in results.items()}, "ratios": ratio_json,
                   "elapsed_s": elapsed}
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
        print(f"- wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
