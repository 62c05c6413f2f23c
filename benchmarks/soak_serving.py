"""Soak of the continuous batcher under faults and bad input (``engine/serving/batcher.py``; not a test).

A background batcher (``ContinuousBatcher.start``) serves ``--requests`` requests submitted by 1..4 client
threads with random (exponential) gaps. The stream mixes every way a request can be given -- seeds and
explicit ``x_T``; heuristic names, explicit grids, INDIS :class:`Schedule` s with shift and/or scale and the
batcher's predictor; seven solvers with their options (list-valued ones included); class labels -- with:

* bad requests (about 10 %: NFE 10**6, NaN or wrongly shaped ``x_T``, unknown solver or option, a schedule
  of ``None``, a negative scale, a shift that sends the network to sigma = inf, an unknown condition); each
  must fail with ``ValueError``;
* injected faults: the denoiser raises on a random 5 % of its calls (every request in that call fails with
  it), returns NaN for samples of class 9 (each must fail with ``FloatingPointError``, never be delivered)
  and the predictor raises for some noises (that request fails);
* cancels at random moments: right after ``submit`` (while the request is queued or validated), after a short
  random delay (often in flight) or late.

Afterwards every future must be done within ``--timeout`` seconds (else: hung) and each outcome must be the
one its request allows: a good request is delivered -- equal to running it alone with ``indis.sample`` (the
same x_T, grid, solver, options, condition; float64), reported as the max absolute difference -- or fails with
the injected denoiser fault, or was cancelled by its client; the batcher's counters must match the futures
(nothing lost, nothing counted twice). Memory: resident set size (after gc and ``malloc_trim``) after an
unreported warm-up row of the same size and after each row, plus the batcher's queues, which must be empty.
Exit status 1 on any violation.

Run:  python benchmarks/soak_serving.py [--requests 3000] [--threads 1,2,3,4] [--seed 0]
      [--out benchmarks/results/serving/serving-soak.md]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import random
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from pathlib import Path

import torch

import indis
from indis.engine.serving.batcher import ContinuousBatcher, Request
from indis.engine.studies.convergence import small_mixture
from indis.engine.tuning.teacher import noise_from_seeds

SHAPE = (6,)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
SOLVERS = ("ipndm", "unipc", "dpmpp_2m", "dpmpp_3m", "heun", "euler", "ipndm_v")
NAN_LABEL = 9          # the denoiser returns NaN for these samples
PREDICTOR_NFE = 4


class FaultyModel:
    """The mixture denoiser plus a class offset; raises on a random share of calls, NaN for NAN_LABEL."""

    def __init__(self, p_raise: float, seed: int) -> None:
        self.mixture, self.p_raise, self.rng = small_mixture(), p_raise, random.Random(seed)
        self.calls = self.raised = 0

    def clean(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.mixture(x, sigma) + 0.01 * class_labels.clamp(min=0).to(x.dtype).view(-1, 1)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.rng.random() < self.p_raise:
            self.raised += 1
            raise RuntimeError("injected denoiser fault")
        out = self.clean(x, sigma, class_labels)
        return torch.where((class_labels == NAN_LABEL).view(-1, 1), torch.full_like(out, float("nan")), out)


class FaultyPredictor(torch.nn.Module):
    """An INDIS predictor that raises for noises whose first coordinate is large (about 2 % of seeds)."""

    def __init__(self) -> None:
        super().__init__()
        cfg = indis.PredictorConfig(indis.ScheduleConfig(nfe=PREDICTOR_NFE, sigma_min=SIGMA_MIN,
                                                         sigma_max=SIGMA_MAX), "ipndm", SHAPE)
        self.phi = indis.Predictor(cfg)
        torch.nn.init.normal_(self.phi.out.weight, std=0.05, generator=torch.Generator().manual_seed(1))

    def forward(self, x_T: torch.Tensor, cond: torch.Tensor | None = None) -> indis.Schedule:
        if float(x_T[0, 0]) > 2.0 * SIGMA_MAX:
            raise RuntimeError("injected predictor fault")
        return self.phi(x_T)


@dataclass
class Case:
    request: Request
    kind: str                       # "good", "bad", "nan"
    future: Future | None = None
    cancelled_by_client: bool = False


def make_case(i: int, rng: random.Random) -> Case:
    """One request of the mixed stream (see the module docstring)."""
    solver = rng.choice(SOLVERS)
    nfe = rng.choice((3, 4, 5, 6))
    label = rng.randrange(-1, 10)
    opts: dict = {}
    if solver == "unipc" and rng.random() < 0.5:
        opts = {"disable_corrector": [1], "variant": rng.choice(("bh1", "bh2"))}
    elif solver in ("ipndm", "ipndm_v") and rng.random() < 0.3:
        opts = {"order": rng.randint(1, 3)}
    u = rng.random()
    schedule: object = rng.choice(("edm", "logsnr", "time_quadratic"))
    if u < 0.15:
        raw = torch.randn(1, nfe + 1, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        schedule = indis.grid_from_logits(raw, SIGMA_MIN, SIGMA_MAX)[0]
    elif u < 0.3:
        raw = torch.randn(1, nfe + 1, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        grid = indis.grid_from_logits(raw, SIGMA_MIN, SIGMA_MAX)[0]
        gen = torch.Generator().manual_seed(i + 1)
        shift = 0.05 * torch.randn(nfe, generator=gen, dtype=torch.float64)
        scale = 1 + 0.02 * torch.randn(nfe, generator=gen, dtype=torch.float64)
        schedule = indis.Schedule(grid, *rng.choice(((shift, scale), (shift, None), (None, scale),
                                                    (None, None))))
    elif u < 0.4:
        schedule, solver, nfe, opts = "predictor", "ipndm", PREDICTOR_NFE, {}
    req = Request(seed=i, nfe=nfe, solver=solver, schedule=schedule, cond={"class_labels": label},
                  solver_opts=opts)
    if rng.random() < 0.3:  # the same sample given as x_T
        req = Request(x_T=noise_from_seeds([i], SHAPE, dtype=torch.float64)[0] * SIGMA_MAX, nfe=nfe,
                      solver=solver, schedule=schedule, cond=req.cond, solver_opts=opts)
    if rng.random() < 0.1:
        bad = rng.choice((
            dict(nfe=10**6), dict(x_T=torch.full(SHAPE, float("nan")), seed=None),
            dict(x_T=torch.zeros(SHAPE[0] + 1), seed=None), dict(solver="dpm_fast"),
            dict(solver_opts={"frobnicate": 1}), dict(schedule=None), dict(cond={"style": 1}),
            dict(nfe=3, schedule=indis.Schedule(indis.get_sigmas("edm", 3, SIGMA_MIN, SIGMA_MAX), None,
                                                torch.tensor([1.0, -1.0, 1.0]))),
            dict(nfe=3, schedule=indis.Schedule(indis.get_sigmas("edm", 3, SIGMA_MIN, SIGMA_MAX),
                                                torch.tensor([1000.0, 0.0, 0.0]), None)),
        ))
        fields = {**req.__dict__, **bad}
        if "x_T" in bad:
            fields["seed"] = None
        return Case(Request(**fields), "bad")
    return Case(req, "nan" if label == NAN_LABEL else "good")


def alone(case: Case, model: FaultyModel, predictor: FaultyPredictor) -> torch.Tensor:
    """The request run by itself with ``indis.sample`` in float64 (what the batcher must deliver)."""
    r = case.request
    if r.x_T is not None:
        x = r.x_T[None]
    else:
        x = noise_from_seeds([r.seed], SHAPE, dtype=torch.float64) * SIGMA_MAX
    if r.schedule == "predictor":
        with torch.no_grad():
            sched = predictor(x.float())
    elif isinstance(r.schedule, str):
        sched = indis.get_sigmas(r.schedule, r.nfe, SIGMA_MIN, SIGMA_MAX)
    else:
        sched = r.schedule
    cond = {"class_labels": torch.tensor([r.cond["class_labels"]])}
    return indis.sample(model.clean, x, sched, r.solver, cond=cond, **r.solver_opts)[0]


def rss_mib() -> float:
    """Resident set size after a garbage collection and glibc's ``malloc_trim`` (so that memory the allocator
    merely keeps in its per-thread arenas -- new client threads add arenas -- is not read as a leak)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the raw figure
        pass
    with open("/proc/self/status") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return kib / 1024


def soak(n: int, threads: int, seed: int, timeout: float) -> dict:
    rng = random.Random(seed)
    model, predictor = FaultyModel(0.05, seed), FaultyPredictor()
    b = ContinuousBatcher(model, SHAPE, capacity=16, predictors={(PREDICTOR_NFE, "ipndm"): predictor},
                          conditions={"class_labels": (-1, 10)}, dtype=torch.float64, max_stages=16)
    cases = [make_case(seed * 1_000_003 + i, rng) for i in range(n)]
    shares = [cases[t::threads] for t in range(threads)]
    b.start()

    def client(mine: list[Case], r: random.Random) -> None:
        late: list[Case] = []
        for c in mine:
            time.sleep(r.expovariate(4000.0))
            c.future = b.submit(c.request)
            u = r.random()
            if u < 0.03:       # at once: still queued or being validated
                c.cancelled_by_client = c.future.cancel() or c.cancelled_by_client
            elif u < 0.08:
                late.append(c)
        for c in late:         # later: often in flight
            time.sleep(r.expovariate(2000.0))
            c.cancelled_by_client = c.future.cancel() or c.cancelled_by_client

    workers = [threading.Thread(target=client, args=(share, random.Random(seed * 7 + t)))
               for t, share in enumerate(shares)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    deadline = time.monotonic() + timeout
    hung = 0
    for c in cases:
        try:
            c.future.exception(timeout=max(0.0, deadline - time.monotonic()))
        except CancelledError:
            pass
        except TimeoutError:
            hung += 1
    wall = time.perf_counter() - t0
    b.close(timeout=10)

    delivered = failed = cancelled = 0
    violations: list[str] = []
    max_diff = 0.0
    for c in cases:
        f = c.future
        if not f.done():
            continue
        if f.cancelled():
            cancelled += 1
            if not c.cancelled_by_client:
                violations.append(f"{c.kind} request cancelled without a client cancel")
            continue
        err = f.exception()
        if err is None:
            delivered += 1
            if c.kind != "good":
                violations.append(f"{c.kind} request delivered: {c.request}")
                continue
            max_diff = max(max_diff, float((f.result() - alone(c, model, predictor)).abs().max()))
            continue
        failed += 1
        injected = "injected" in str(err)  # a denoiser fault (RuntimeError) or a predictor one (ValueError)
        expected = {"bad": isinstance(err, ValueError), "good": injected,
                    "nan": isinstance(err, FloatingPointError) or injected}[c.kind]
        if not expected:
            violations.append(f"{c.kind} request failed with {type(err).__name__}: {err}")
    counted = (b.stats["completed"], b.stats["failed"], b.stats["cancelled"])
    if counted != (delivered, failed, cancelled):
        violations.append(f"batcher counted (completed, failed, cancelled) = {counted}, the futures say "
                          f"{(delivered, failed, cancelled)}")
    if b.live or b.waiting:
        violations.append(f"{len(b.live)} live and {len(b.waiting)} waiting requests left behind")
    return {"threads": threads, "requests": n, "delivered": delivered, "failed": failed,
            "cancelled": cancelled, "hung": hung, "violations": violations, "max_diff": max_diff,
            "kinds": {k: sum(c.kind == k for c in cases) for k in ("good", "bad", "nan")},
            "client_cancels": sum(c.cancelled_by_client for c in cases), "denoiser_calls": model.calls,
            "denoiser_faults": model.raised, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3000, help="requests per thread setting")
    p.add_argument("--threads", default="1,2,3,4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds the futures may take to finish")
    p.add_argument("--out", default=None, help="write the report (markdown) here too")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    soak(args.requests, 2, args.seed + 99, args.timeout)  # warm-up row (not reported): imports, allocator
    rss_before = rss_mib()
    rows = []
    for t in args.threads.split(","):
        rows.append(soak(args.requests, int(t), args.seed + int(t), args.timeout))
        rows[-1]["rss_mib"] = rss_mib()  # the row's batcher, futures and threads are gone by now
    rss_after = rss_mib()
    lines = [f"# Batcher soak: {args.requests} requests per row, seed {args.seed}",
             "", f"Command: `python benchmarks/soak_serving.py --requests {args.requests} --threads "
                 f"{args.threads} --seed {args.seed}`", "",
             "| threads | good / bad / NaN-class | delivered | failed | cancelled (client cancels) | hung | "
             "violations | max diff vs alone (float64) | denoiser calls (faults) | wall s | RSS after, MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["kinds"]
        lines.append(f"| {r['threads']} | {k['good']} / {k['bad']} / {k['nan']} | {r['delivered']} | "
                     f"{r['failed']} | {r['cancelled']} ({r['client_cancels']}) | {r['hung']} | "
                     f"{len(r['violations'])} | {r['max_diff']:.3g} | {r['denoiser_calls']} "
                     f"({r['denoiser_faults']}) | {r['wall_s']:.1f} | {r['rss_mib']:.1f} |")
    lines += ["", f"Resident memory after the warm-up: {rss_before:.1f} MiB; after all rows: {rss_after:.1f} "
                  f"MiB ({rss_after - rss_before:+.1f} MiB)."]
    bad = [v for r in rows for v in r["violations"]] + [f"{r['hung']} hung" for r in rows if r["hung"]]
    lines += ["", "Verdict: " + ("PASS -- 0 lost, 0 duplicated, 0 hung, 0 wrong outcomes" if not bad else
                                 "FAIL:\n" + "\n".join(f"- {v}" for v in bad[:20]))]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
