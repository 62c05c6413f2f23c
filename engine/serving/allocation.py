"""Instance-aware NFE allocation (beyond the INDIS paper): choose each sample's NFE from x_T.

An :class:`ErrorPredictor` reads an image-shaped input -- the initial noise x_T, or the denoiser's first
output D(x_T; sigma_max), which every schedule starting at sigma_max without a shift computes anyway
(otherwise it costs one extra evaluation) -- and, for a conditional model, the class label, and predicts
the sample's log teacher error at each NFE of a set
(e.g. {3, 5, 7}, each with its own schedule). :func:`allocate` then picks per-sample NFEs that meet an
average-NFE budget with the least predicted error: a Lagrangian choice ``argmin_k err_k + lam * nfe_k`` per
sample with ``lam`` found by bisection, the budget's remainder spent on the best marginal upgrades. Ragged NFE
costs nothing extra in indis: finished samples leave the batch (``indis.engine.serving.batcher``).

The study that measures it is ``python -m indis.engine.studies.allocation``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ErrorPredictor(nn.Module):
    """Input ``[B, C, H, W]`` (x_T or D(x_T; sigma_max)) and, for a conditional model, the class label
    ``[B]`` -> predicted log teacher error ``[B, K]``."""

    def __init__(self, shape: Sequence[int], nfes: Sequence[int], *, input_scale: float, num_classes: int = 0,
                 pool: int = 8, hidden: int = 128) -> None:
        super().__init__()
        self.shape, self.nfes, self.input_scale, self.pool = tuple(shape), tuple(nfes), input_scale, pool
        self.num_classes = num_classes
        features = shape[0] * pool * pool + 1 + num_classes
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, len(nfes)))

    def forward(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        if (labels is None) != (self.num_classes == 0):
            wanted = "class labels" if self.num_classes else "no labels"
            raise ValueError(f"this predictor takes {wanted}")
        eps = x_T.float() * self.input_scale
        h, w = self.shape[1:]
        pooled = F.adaptive_avg_pool2d(eps, self.pool) * math.sqrt(h * w / self.pool ** 2)
        norm = eps.flatten(1).pow(2).mean(1, keepdim=True)  # the input's energy, a cheap global statistic
        parts = [pooled.flatten(1), norm]
        if labels is not None:
            labels = labels.long()
            if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
                raise ValueError(f"class labels must lie in [0, {self.num_classes})")
            parts.append(F.one_hot(labels, self.num_classes).float())
        return self.net(torch.cat(parts, dim=1))


def fit_error_predictor(x_T: Tensor, errors: Tensor, nfes: Sequence[int], *, input_scale: float,
                        labels: Tensor | None = None, num_classes: int = 0, steps: int = 600,
                        lr: float = 3e-3, weight_decay: float = 1e-3, seed: int = 0,
                        **head: int) -> ErrorPredictor:
    """Regress log errors ``[M, K]`` on x_T (and labels; full batch Adam; small data, small head)."""
    torch.manual_seed(seed)
    model = ErrorPredictor(x_T.shape[1:], nfes, input_scale=input_scale, num_classes=num_classes, **head)
    target = errors.clamp_min(1e-12).log().float()
    with torch.no_grad():
        model.net[-1].bias.copy_(target.mean(0))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x_T, labels), target)
        loss.backward()
        opt.step()
    return model.eval()


def price_for_budget(scores: Tensor, nfes: Sequence[int], budget: float, iters: int = 60) -> float:
    """The cheapest price ``lam`` (error per NFE) at which ``argmin_k scores[i, k] + lam * nfe_k`` keeps the
    mean NFE of ``scores`` ``[B, K]`` (linear errors) within ``budget`` (bisection)."""
    cost = torch.tensor(nfes, dtype=scores.dtype)
    if not min(nfes) <= budget <= max(nfes):
        raise ValueError(f"budget {budget} must lie in [{min(nfes)}, {max(nfes)}]")
    lo, hi = 0.0, float(scores.max() - scores.min()) / max(1e-12, float(cost.max() - cost.min())) * 10 + 1.0
    for _ in range(iters):
        lam = (lo + hi) / 2
        pick = (scores + lam * cost).argmin(1)
        lo, hi = (lo, lam) if cost[pick].mean() <= budget else (lam, hi)
    return hi


class NFEChooser:
    """Instance-aware NFE choice for a request stream (beyond the INDIS paper), one admission at a time.

    ``scores(x_T [B, ...], labels [B] or None) -> predicted errors [B, K]`` (linear units; e.g. an
    :class:`ErrorPredictor`'s ``exp``). Each sample takes ``argmin_k scores_k + lam * nfes[k]``. The price
    ``lam`` starts at the one that meets ``budget`` on a calibration set (:func:`price_for_budget`) and then
    follows the stream by dual ascent -- multiplied by ``exp(rate * (chosen mean NFE - budget) / span)`` after
    each call -- so the mean NFE over many requests tracks the budget without seeing them all at once (unlike
    :func:`allocate`).
    """

    def __init__(self, scores: Callable[[Tensor, Tensor | None], Tensor], nfes: Sequence[int], budget: float,
                 calibration: Tensor, rate: float = 0.05) -> None:
        self.scores, self.nfes, self.budget, self.rate = scores, tuple(nfes), budget, rate
        self.price = max(price_for_budget(calibration, nfes, budget), 1e-12)
        self.span = max(nfes) - min(nfes)
        self._cost = torch.tensor(nfes, dtype=torch.float64)

    def __call__(self, x_T: Tensor, labels: Tensor | None = None) -> list[int]:
        with torch.no_grad():
            scores = self.scores(x_T, labels).double()
        pick = (scores + self.price * self._cost).argmin(1)
        chosen = self._cost[pick]
        self.price *= math.exp(self.rate * len(pick) * float(chosen.mean() - self.budget) / self.span)
        return [self.nfes[k] for k in pick.tolist()]


def allocate(scores: Tensor, nfes: Sequence[int], budget: float, iters: int = 60) -> Tensor:
    """Per-sample index into ``nfes`` minimising ``sum scores[i, k]`` with mean NFE <= ``budget``.

    ``scores`` are (predicted or true) errors ``[B, K]`` in linear units. Lagrangian relaxation: for a price
    ``lam`` each sample takes ``argmin_k scores + lam * nfe_k``; bisection finds the cheapest price within
    budget, then leftover budget buys the upgrades with the best error reduction per extra NFE.
    """
    cost = torch.tensor(nfes, dtype=scores.dtype)
    pick = (scores + price_for_budget(scores, nfes, budget, iters) * cost).argmin(1)
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
