"""Instance-aware NFE allocation (beyond the INDIS paper): choose each sample's NFE from x_T.

An :class:`ErrorPredictor` reads an image-shaped input -- the initial noise x_T, or the denoiser's first
output D(x_T; sigma_max), which every schedule starting at sigma_max without a shift computes anyway
(otherwise it costs one extra evaluation) -- and predicts the sample's log teacher error at each NFE of a set
(e.g. {3, 5, 7}, each with its own schedule). :func:`allocate` then picks per-sample NFEs that meet an
average-NFE budget with the least predicted error: a Lagrangian choice ``argmin_k err_k + lam * nfe_k`` per
sample with ``lam`` found by bisection, the budget's remainder spent on the best marginal upgrades. Ragged NFE
costs nothing extra in indis: finished samples leave the batch (``indis.engine.serving``).

``python -m indis.engine.allocation`` measures it on the digits UNet with the shipped INDIS heads at NFE
3/5/7: quality against average NFE for the allocator, the oracle allocation (true errors: the headroom), the
fixed NFEs and the blind mix of fixed NFEs at the same average cost, on held-out seeds.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ErrorPredictor(nn.Module):
    """Input ``[B, C, H, W]`` (x_T or D(x_T; sigma_max)) -> predicted log teacher error ``[B, K]``."""

    def __init__(self, shape: Sequence[int], nfes: Sequence[int], *, input_scale: float, pool: int = 8,
                 hidden: int = 128) -> None:
        super().__init__()
        self.shape, self.nfes, self.input_scale, self.pool = tuple(shape), tuple(nfes), input_scale, pool
        features = shape[0] * pool * pool
        self.net = nn.Sequential(nn.Linear(features + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, len(nfes)))

    def forward(self, x_T: Tensor) -> Tensor:
        eps = x_T.float() * self.input_scale
        h, w = self.shape[1:]
        pooled = F.adaptive_avg_pool2d(eps, self.pool) * math.sqrt(h * w / self.pool ** 2)
        norm = eps.flatten(1).pow(2).mean(1, keepdim=True)  # the input's energy, a cheap global statistic
        return self.net(torch.cat([pooled.flatten(1), norm], dim=1))


def fit_error_predictor(x_T: Tensor, errors: Tensor, nfes: Sequence[int], *, input_scale: float,
                        steps: int = 600, lr: float = 3e-3, weight_decay: float = 1e-3, seed: int = 0,
                        **head: int) -> ErrorPredictor:
    """Regress log errors ``[M, K]`` on x_T (full batch Adam; small data, small head)."""
    torch.manual_seed(seed)
    model = ErrorPredictor(x_T.shape[1:], nfes, input_scale=input_scale, **head)
    target = errors.clamp_min(1e-12).log().float()
    with torch.no_grad():
        model.net[-1].bias.copy_(target.mean(0))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x_T), target)
        loss.backward()
        opt.step()
    return model.eval()


def allocate(scores: Tensor, nfes: Sequence[int], budget: float, iters: int = 60) -> Tensor:
    """Per-sample index into ``nfes`` minimising ``sum scores[i, k]`` with mean NFE <= ``budget``.

    ``scores`` are (predicted or true) errors ``[B, K]`` in linear units. Lagrangian relaxation: for a price
    ``lam`` each sample takes ``argmin_k scores + lam * nfe_k``; bisection finds the cheapest price within
    budget, then leftover budget buys the upgrades with the best error reduction per extra NFE.
    """
    cost = torch.tensor(nfes, dtype=scores.dtype)
    if not min(nfes) <= budget <= max(nfes):
        raise ValueError(f"budget {budget} must lie in [{min(nfes)}, {max(nfes)}]")
    lo, hi = 0.0, float(scores.max() - scores.min()) / max(1e-12, float(cost.max() - cost.min())) * 10 + 1.0
    for _ in range(iters):
        lam = (lo + hi) / 2
        pick = (scores + lam * cost).argmin(1)
        lo, hi = (lo, lam) if cost[pick].mean() <= budget else (lam, hi)
    pick = (scores + hi * cost).argmin(1)
    spare = budget * len(pick) - float(cost[pick].sum())
    while True:  # greedy upgrades within the remaining budget
        extra = cost[None, :] - cost[pick][:, None]
        gain = scores[torch.arange(len(pick)), pick][:, None] - scores
        rate = torch.where((extra > 0) & (extra <= spare) & (gain > 0), gain / extra.clamp_min(1e-12), -1.0)
        best = int(rate.argmax())
        i, k = divmod(best, len(nfes))
        if rate[i, k] <= 0:
            return pick
        spare -= float(extra[i, k])
        pick[i] = k


def per_sample_errors(model: Callable[..., Tensor], x_T: Tensor, x0: Tensor,
                      schedules: dict[int, Callable[[Tensor], object]], solver: str,
                      batch_size: int = 256) -> Tensor:
    """Teacher MSE of every sample at every NFE ``[M, K]`` (schedules: NFE -> x_T -> grid or Schedule)."""
    from .sampling import sample

    cols = []
    for schedule in schedules.values():
        outs = []
        with torch.no_grad():
            for a in range(0, len(x_T), batch_size):
                x = x_T[a:a + batch_size]
                outs.append(sample(model, x, schedule(x), solver))
        cols.append((torch.cat(outs) - x0).flatten(1).pow(2).mean(1))
    return torch.stack(cols, dim=1)


def first_output(model: Callable[..., Tensor], x_T: Tensor, sigma_max: float = 80.0,
                 batch_size: int = 512) -> Tensor:
    """The denoiser's output at the grid's first point, D(x_T; sigma_max)."""
    with torch.no_grad():
        return torch.cat([model(x, torch.full((len(x),), sigma_max)) for x in x_T.split(batch_size)])


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
    """Mean error of the best x_T-blind strategy at this average cost: a mix of the two neighbouring fixed
    NFEs in the proportions that meet the budget (linear interpolation of the fixed-NFE errors)."""
    means = errors.mean(0).tolist()
    for (n0, e0), (n1, e1) in zip(zip(nfes, means, strict=True), zip(nfes[1:], means[1:], strict=True),
                                  strict=False):
        if n0 <= budget <= n1:
            t = (budget - n0) / (n1 - n0)
            return (1 - t) * e0 + t * e1
    raise ValueError(f"budget {budget} outside {nfes}")


def main(argv: Sequence[str] | None = None) -> int:
    from .digits import load_backbone
    from .predictor import Predictor
    from .teacher import TeacherCache

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2048, help="seeds to fit the error predictor on")
    ap.add_argument("--test", type=int, default=1024, help="held-out seeds")
    ap.add_argument("--nfes", default="3,5,7")
    ap.add_argument("--heads", default=str(Path(__file__).parent / "weights" / "indis"))
    ap.add_argument("--cache", default=".indis-cache/teacher")
    ap.add_argument("--out", default=None, help="write the table (markdown) here too")
    a = ap.parse_args(argv)
    nfes = [int(v) for v in a.nfes.split(",")]
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model = load_backbone("unet")
    heads = {n: Predictor.load(Path(a.heads) / f"digits-unet_ipndm_nfe{n}_phi.safetensors") for n in nfes}
    cache = TeacherCache(a.cache, backbone="digits-unet", shape=(1, 8, 8), sigma_min=0.002, sigma_max=80.0)
    train_seeds, test_seeds = range(1 << 19, (1 << 19) + a.train), range(1 << 20, (1 << 20) + a.test)
    data = {}
    for name, seeds in (("train", train_seeds), ("test", test_seeds)):
        cache.build(model, seeds)
        d = cache.load(seeds)
        schedules = {n: (lambda x, phi=heads[n]: phi(x).detach()) for n in nfes}
        data[name] = (d.x_T, per_sample_errors(model, d.x_T, d.x0, schedules, "ipndm"))
    e_tr, e_te = data["train"][1], data["test"][1]
    budgets = [b / 2 for b in range(2 * nfes[0] + 1, 2 * nfes[-1])]
    inputs = {"x_T": (lambda x: x, 1 / 80.0), "D(x_T; sigma_max)": (lambda x: first_output(model, x), 1.0)}
    learned, corr = {}, {}
    for name, (feature, scale) in inputs.items():
        phi = fit_error_predictor(feature(data["train"][0]), e_tr, nfes, input_scale=scale)
        with torch.no_grad():
            pred = phi(feature(data["test"][0])).double()
        corr[name] = [float(torch.corrcoef(torch.stack([pred[:, k], e_te[:, k].log()]))[0, 1])
                      for k in range(len(nfes))]
        learned[name] = curve(e_te, lambda b, pred=pred: allocate(pred.exp(), nfes, b), nfes, budgets)
    oracle = curve(e_te, lambda b: allocate(e_te, nfes, b), nfes, budgets)
    lines = [f"# Instance-aware NFE allocation: digits UNet, INDIS heads at NFE {nfes} (iPNDM), "
             f"{a.train} fitting seeds, {a.test} held-out seeds, teacher MSE", "",
             "Fixed NFE, mean teacher MSE: " + ", ".join(f"NFE {n}: {float(e_te[:, k].mean()):.5f}"
                                                        for k, n in enumerate(nfes)), ""]
    for name, c in corr.items():
        lines.append(f"Error predictor on {name}: correlation of predicted and true log error (held out): "
                     + ", ".join(f"NFE {n}: {v:.2f}" for n, v in zip(nfes, c, strict=True)))
    names = list(inputs)
    header = " | ".join(f"allocator on {n} (vs blind)" for n in names)
    lines += ["", f"| budget (mean NFE) | blind mix of fixed NFEs | {header} | oracle allocation |",
              "|---" * (3 + len(names)) + "|"]
    for i, b in enumerate(budgets):
        bm = blind_mix(e_te, nfes, b)
        cells = [f"{learned[n][i][1]:.5f} ({100 * (learned[n][i][1] / bm - 1):+.1f} %)" for n in names]
        lines.append(f"| {b:g} | {bm:.5f} | " + " | ".join(cells) + f" | {oracle[i][1]:.5f} "
                     f"({100 * (oracle[i][1] / bm - 1):+.1f} %) |")
    gap = max(abs(v[i][0] - b) for v in (*learned.values(), oracle) for i, b in enumerate(budgets))
    lines += ["", f"Every allocation meets its budget: max |mean NFE - budget| = {gap:.3f}.", "",
              "Share of samples at NFE " + " / ".join(map(str, nfes)) + " (a request stream for "
              "`benchmarks/bench_serving.py --nfe " + ",".join(f"{n}:SHARE" for n in nfes) + "`):", "",
              f"| budget (mean NFE) | {' | '.join(f'allocator on {n}' for n in names)} | oracle allocation |",
              "|---" * (2 + len(names)) + "|"]
    for i, b in enumerate(budgets):
        shares = [" / ".join(f"{v:.2f}" for v in c[i][2]) for c in (*learned.values(), oracle)]
        lines.append(f"| {b:g} | " + " | ".join(shares) + " |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
