"""NFE-allocation study: ``python -m indis.engine.studies.allocation [--testbed T]``.

Measures the instance-aware NFE allocator (``indis.engine.serving.allocation``) with the INDIS heads of T
(digits-unet, digits-dit or digits-gmm) at NFE 3/5/7: quality against average NFE for the allocator, the
oracle allocation (true errors: the headroom), the fixed NFEs and the blind mix of fixed NFEs at the same
average cost, on held-out seeds (for the class-conditional DiT also an allocation from the class label alone).
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from indis.engine.core.sampling import sample
from indis.engine.serving.allocation import NFEChooser, allocate, fit_error_predictor
from indis.engine.studies.quality import TESTBEDS, load_phi
from indis.engine.testbeds.digits import SHIPPED_HEADS


def per_sample_errors(model: Callable[..., Tensor], x_T: Tensor, x0: Tensor,
                      schedules: dict[int, Callable[[Tensor, Tensor | None], object]], solver: str,
                      labels: Tensor | None = None, batch_size: int = 256) -> Tensor:
    """Teacher MSE of every sample at every NFE ``[M, K]`` (schedules: NFE -> (x_T, labels) -> grid or
    Schedule)."""
    cols = []
    for schedule in schedules.values():
        outs = []
        with torch.no_grad():
            for a in range(0, len(x_T), batch_size):
                x, c = x_T[a:a + batch_size], None if labels is None else labels[a:a + batch_size]
                outs.append(sample(model, x, schedule(x, c), solver,
                                   cond=None if c is None else {"class_labels": c}))
        cols.append((torch.cat(outs) - x0).flatten(1).pow(2).mean(1))
    return torch.stack(cols, dim=1)


def first_output(model: Callable[..., Tensor], x_T: Tensor, labels: Tensor | None = None,
                 sigma_max: float = 80.0, batch_size: int = 512) -> Tensor:
    """The denoiser's output at the grid's first point, D(x_T; sigma_max)."""
    outs = []
    with torch.no_grad():
        for a in range(0, len(x_T), batch_size):
            x = x_T[a:a + batch_size]
            cond = {} if labels is None else {"class_labels": labels[a:a + batch_size]}
            outs.append(model(x, torch.full((len(x),), sigma_max), **cond))
    return torch.cat(outs)


def curve(errors: Tensor, chosen: Callable[[float], Tensor], nfes: Sequence[int],
          budgets: Sequence[float]) -> list[tuple[float, float, list[float]]]:
    """(actual mean NFE, mean true error, share of samples at each NFE) of an allocation rule at each
    budget."""
    cost = torch.tensor(nfes, dtype=errors.dtype)
    out = []
    for b in budgets:
        pick = chosen(b)
        share = torch.bincount(pick, minlength=len(nfes)).double().div(len(pick)).tolist()
        out.append((float(cost[pick].mean()), float(errors[torch.arange(len(pick)), pick].mean()), share))
    return out


def blind_mix(errors: Tensor, nfes: Sequence[int], budget: float) -> float:
    """Mean error of the best x_T-blind strategy with mean NFE at most ``budget``: one fixed NFE, or a random
    mix of two in the proportions that spend the budget (the lower convex hull of the fixed-NFE errors; with
    a convex curve decreasing in NFE, the two neighbouring NFEs)."""
    means = errors.mean(0).tolist()
    best = min((e for n, e in zip(nfes, means, strict=True) if n <= budget), default=math.inf)
    for i, j in itertools.combinations(range(len(nfes)), 2):
        lo, hi = sorted((nfes[i], nfes[j]))
        if lo < budget < hi:
            t = (budget - lo) / (hi - lo)
            e_lo, e_hi = (means[i], means[j]) if nfes[i] < nfes[j] else (means[j], means[i])
            best = min(best, (1 - t) * e_lo + t * e_hi)
    if math.isinf(best):
        raise ValueError(f"budget {budget} is below every NFE in {nfes}")
    return best


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", default="digits-unet",
                    choices=("digits-unet", "digits-dit", "digits-gmm"))
    ap.add_argument("--train", type=int, default=2048, help="seeds to fit the error predictor on")
    ap.add_argument("--test", type=int, default=1024, help="held-out seeds")
    ap.add_argument("--nfes", default="3,5,7")
    ap.add_argument("--heads", default=None, help="directory of the INDIS heads (default: the shipped ones "
                    "for digits-unet, benchmarks/results/quality/heads -- relative to the working directory, "
                    "the repository root -- for the others)")
    ap.add_argument("--cache", default=".indis-cache/teacher")
    ap.add_argument("--out", default=None, help="write the table (markdown) here too")
    a = ap.parse_args(argv)
    nfes = [int(v) for v in a.nfes.split(",")]
    if len(nfes) < 2 or nfes != sorted(set(nfes)):
        ap.error(f"--nfes {a.nfes}: give at least two NFEs in increasing order")
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    tb = TESTBEDS[a.testbed]()
    heads_dir = Path(a.heads) if a.heads else (
        SHIPPED_HEADS if tb.name == "digits-unet"
        else Path("benchmarks/results/quality/heads"))
    model = tb.load()
    heads = {n: load_phi(heads_dir, tb, n) for n in nfes}
    cache = tb.tuning_setup(model, nfes[0], a.cache).cache()
    train_seeds, test_seeds = range(1 << 19, (1 << 19) + a.train), range(1 << 20, (1 << 20) + a.test)
    data = {}
    for name, seeds in (("train", train_seeds), ("test", test_seeds)):
        cache.build(model, seeds)
        d = cache.load(seeds)
        schedules = {n: (lambda x, c, phi=heads[n]: phi(x, c).detach()) for n in nfes}
        data[name] = (d.x_T, d.labels, per_sample_errors(model, d.x_T, d.x0, schedules, tb.solver, d.labels))
    (x_tr, l_tr, e_tr), (x_te, l_te, e_te) = data["train"], data["test"]
    budgets = [b / 2 for b in range(2 * nfes[0] + 1, 2 * nfes[-1])]
    inputs = {"x_T": (lambda x, c: x, 1 / tb.sigma_max),
              "D(x_T; sigma_max)": (lambda x, c: first_output(model, x, c, tb.sigma_max), 1.0)}
    predicted, corr = {}, {}  # input -> predicted errors (calibration = fitting seeds, held-out seeds)
    for name, (feature, scale) in inputs.items():
        phi = fit_error_predictor(feature(x_tr, l_tr), e_tr, nfes, input_scale=scale, labels=l_tr,
                                  num_classes=tb.num_classes)
        with torch.no_grad():
            cal, test = (phi(feature(x, c), c).double().exp() for x, c in ((x_tr, l_tr), (x_te, l_te)))
        predicted[name] = (cal, test)
        corr[name] = [float(torch.corrcoef(torch.stack([test[:, k].log(), e_te[:, k].log()]))[0, 1])
                      for k in range(len(nfes))]
    if l_tr is not None:  # the class alone: each class's mean error over the fitting seeds
        if len(set(l_tr.tolist())) < tb.num_classes:
            raise ValueError(f"some class has no fitting seed; use more than {a.train} (--train)")
        means = torch.stack([e_tr[l_tr == k].mean(0) for k in range(tb.num_classes)])
        predicted["the class label alone"] = (means[l_tr], means[l_te])
    rules = {name: (lambda b, s=test: allocate(s, nfes, b)) for name, (_, test) in predicted.items()}
    learned = {name: curve(e_te, rule, nfes, budgets) for name, rule in rules.items()}
    online = {name: online_curve(e_te, test, cal, nfes, budgets) for name, (cal, test) in predicted.items()}
    oracle = curve(e_te, lambda b: allocate(e_te, nfes, b), nfes, budgets)
    label_note = " (and the class label)" if l_tr is not None else ""
    lines = [f"# Instance-aware NFE allocation: {tb.name}, INDIS heads at NFE {nfes} ({tb.solver}), "
             f"{a.train} fitting seeds, {a.test} held-out seeds, teacher MSE", "",
             "Fixed NFE, mean teacher MSE: " + ", ".join(f"NFE {n}: {float(e_te[:, k].mean()):.5f}"
                                                        for k, n in enumerate(nfes)), ""]
    for name, c in corr.items():
        lines.append(f"Error predictor on {name}{label_note}: correlation of predicted and true log error "
                     "(held out): " + ", ".join(f"NFE {n}: {v:.2f}" for n, v in zip(nfes, c, strict=True)))
    names = list(learned)
    header = " | ".join(f"allocator on {n} (vs blind)" for n in names)
    lines += ["", f"| budget (mean NFE) | best blind mix of fixed NFEs | {header} | oracle allocation |",
              "|---" * (3 + len(names)) + "|"]
    for i, b in enumerate(budgets):
        bm = blind_mix(e_te, nfes, b)
        cells = [f"{learned[n][i][1]:.5f} ({100 * (learned[n][i][1] / bm - 1):+.1f} %)" for n in names]
        lines.append(f"| {b:g} | {bm:.5f} | " + " | ".join(cells) + f" | {oracle[i][1]:.5f} "
                     f"({100 * (oracle[i][1] / bm - 1):+.1f} %) |")
    over = max(v[i][0] - b for v in (*learned.values(), oracle) for i, b in enumerate(budgets))
    unspent = max(b - v[i][0] for v in (*learned.values(), oracle) for i, b in enumerate(budgets))
    verdict = "No allocation exceeds its budget" if over <= 1e-9 else "SOME ALLOCATION EXCEEDS ITS BUDGET"
    lines += ["", f"{verdict} (max mean NFE - budget: {over:+.3f}); the most budget "
              f"left unspent (where more steps do not lower the predicted error): {unspent:.3f} NFE.", "",
              "Share of samples at NFE " + " / ".join(map(str, nfes)) + " (a request stream for "
              "`benchmarks/bench_serving.py --nfe " + ",".join(f"{n}:SHARE" for n in nfes) + "`):", "",
              f"| budget (mean NFE) | {' | '.join(f'allocator on {n}' for n in names)} | oracle allocation |",
              "|---" * (2 + len(names)) + "|"]
    for i, b in enumerate(budgets):
        shares = [" / ".join(f"{v:.2f}" for v in c[i][2]) for c in (*learned.values(), oracle)]
        lines.append(f"| {b:g} | " + " | ".join(shares) + " |")
    lines += ["", f"Online (`NFEChooser`): the held-out seeds arrive {ONLINE_CHUNK} at a time, the price "
              "starts where the fitting seeds meet the budget and follows the stream; mean NFE reached: mean "
              "error (vs the best blind mix at that mean NFE):", "",
              f"| budget (mean NFE) | {' | '.join(f'allocator on {n}' for n in names)} |",
              "|---" * (1 + len(names)) + "|"]
    for i, b in enumerate(budgets):
        cells = [f"{c[i][0]:.2f}: {c[i][1]:.5f} "
                 f"({100 * (c[i][1] / blind_mix(e_te, nfes, c[i][0]) - 1):+.1f} %)" for c in online.values()]
        lines.append(f"| {b:g} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        rules["oracle allocation"] = lambda b: allocate(e_te, nfes, b)
        plot_curves(out.with_suffix(".png"), tb.name, e_te, nfes, rules)
    return 0


ONLINE_CHUNK = 8  # requests admitted together in the online simulation


def online_curve(errors: Tensor, scores: Tensor, calibration: Tensor, nfes: Sequence[int],
                 budgets: Sequence[float], chunk: int = ONLINE_CHUNK) -> list[tuple[float, float]]:
    """(mean NFE reached, mean true error) of an :class:`NFEChooser` fed the predicted ``scores`` of a stream
    ``chunk`` samples at a time, its price calibrated on ``calibration``, at each budget."""
    out = []
    for b in budgets:
        chooser = NFEChooser(lambda s, _: s, nfes, b, calibration)
        picks = [nfes.index(n) for block in scores.split(chunk) for n in chooser(block)]
        idx = torch.tensor(picks)
        out.append((float(torch.tensor(nfes, dtype=torch.float64)[idx].mean()),
                    float(errors[torch.arange(len(idx)), idx].mean())))
    return out


def plot_curves(path: Path, title: str, errors: Tensor, nfes: Sequence[int],
                rules: dict[str, Callable[[float], Tensor]], step: float = 0.25) -> Path | None:
    """Mean error against mean NFE: the fixed NFEs, the best blind mix and each allocation rule (budgets
    ``nfes[0]..nfes[-1]`` every ``step``); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'indis[plot]')")
        return None
    budgets = [nfes[0] + step * i for i in range(round((nfes[-1] - nfes[0]) / step) + 1)]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(nfes, errors.mean(0).tolist(), "ks", label="fixed NFE")
    ax.plot(budgets, [blind_mix(errors, nfes, b) for b in budgets], "k--", lw=1, label="best blind mix")
    for name, rule in rules.items():
        points = curve(errors, rule, nfes, budgets)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".",
                label=name if name.startswith("oracle") else f"allocator on {name}")
    ax.set(title=f"NFE allocation, {title} (held-out seeds)", xlabel="mean NFE", ylabel="mean teacher MSE",
           yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
