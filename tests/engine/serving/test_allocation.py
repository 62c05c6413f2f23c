"""NFE allocation: budget met, optimal on small exhaustive cases, predictor learns a planted relation."""

from __future__ import annotations

import itertools

import pytest
import torch

from indis.engine.serving.allocation import NFEChooser, allocate, fit_error_predictor
from indis.engine.studies.allocation import blind_mix, curve

NFES = [3, 5, 7]


def test_allocation_meets_the_budget_and_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        base = torch.rand(5, 1, generator=g, dtype=torch.float64) + 0.1
        errors = base * torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64) ** torch.rand(5, 1, generator=g)
        errors = errors.cumprod(1) if trial % 2 else errors  # decreasing in NFE either way
        for budget in (3.0, 4.2, 5.0, 6.6, 7.0):
            pick = allocate(errors, NFES, budget)
            cost = torch.tensor(NFES, dtype=torch.float64)[pick]
            assert float(cost.mean()) <= budget + 1e-9
            got = float(errors[torch.arange(5), pick].sum())
            feasible = [c for c in itertools.product(range(3), repeat=5)
                        if sum(NFES[k] for k in c) <= budget * 5 + 1e-9]
            best = min(float(sum(errors[i, k] for i, k in enumerate(c))) for c in feasible)
            assert got <= best * 1.15 + 1e-12  # Lagrangian + greedy: near the exhaustive optimum


def test_allocation_sends_hard_samples_to_more_steps() -> None:
    errors = torch.tensor([[1.0, 0.5, 0.1], [0.02, 0.015, 0.01]], dtype=torch.float64)
    assert allocate(errors, NFES, 5.0).tolist() == [2, 0]
    with pytest.raises(ValueError, match="budget"):
        allocate(errors, NFES, 8.0)


def test_blind_mix_is_the_lower_hull_of_the_fixed_nfe_errors() -> None:
    errors = torch.tensor([[0.4, 0.2, 0.1], [0.2, 0.1, 0.05]])
    assert blind_mix(errors, NFES, 4.0) == pytest.approx((0.3 + 0.15) / 2)
    assert blind_mix(errors, NFES, 7.0) == pytest.approx(0.075)
    # a non-convex curve (NFE 5 barely better than 3): mixing 3 and 7 beats the neighbours 3 and 5
    errors = torch.tensor([[0.30, 0.29, 0.01]])
    assert blind_mix(errors, NFES, 4.0) == pytest.approx(0.75 * 0.30 + 0.25 * 0.01)
    # more steps that do not help: the blind strategy may leave budget unspent
    assert blind_mix(torch.tensor([[0.3, 0.1, 0.2]]), NFES, 6.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="budget"):
        blind_mix(errors, NFES, 2.0)


def test_curve_reports_cost_error_and_the_nfe_mix() -> None:
    errors = torch.tensor([[0.4, 0.2, 0.1], [0.2, 0.1, 0.05], [0.3, 0.1, 0.01], [0.2, 0.2, 0.2]],
                          dtype=torch.float64)
    picks = {4.0: torch.tensor([0, 1, 2, 0]), 5.5: torch.tensor([1, 1, 2, 2])}
    got = curve(errors, picks.__getitem__, NFES, list(picks))
    assert got[0] == (4.5, pytest.approx((0.4 + 0.1 + 0.01 + 0.2) / 4), [0.5, 0.25, 0.25])
    assert got[1] == (6.0, pytest.approx((0.2 + 0.1 + 0.01 + 0.2) / 4), [0.0, 0.5, 0.5])


def test_error_predictor_learns_a_planted_relation() -> None:
    """Errors that grow with the noise's energy are predicted from x_T (held-out correlation)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 1, 8, 8, generator=g) * (0.5 + torch.rand(1024, 1, 1, 1, generator=g)) * 80
    energy = (x / 80).pow(2).mean((1, 2, 3))
    noise = torch.exp(0.05 * torch.randn(1024, 3, generator=g))
    errors = energy[:, None] * torch.tensor([0.4, 0.2, 0.1]) * noise
    phi = fit_error_predictor(x[:768], errors[:768], NFES, input_scale=1 / 80, steps=300)
    with torch.no_grad():
        pred = phi(x[768:])
    corr = torch.corrcoef(torch.stack([pred[:, 1], errors[768:, 1].log()]))[0, 1]
    assert corr > 0.9


def test_error_predictor_reads_the_class_label() -> None:
    """Errors set by the class alone are learned from the label; a label-less predictor refuses labels."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1024, 1, 8, 8, generator=g) * 80
    labels = torch.randint(0, 10, (1024,), generator=g)
    errors = (0.01 * (1 + labels.double()))[:, None] * torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
    phi = fit_error_predictor(x[:768], errors[:768], NFES, input_scale=1 / 80, labels=labels[:768],
                              num_classes=10, steps=300)
    with torch.no_grad():
        pred = phi(x[768:], labels[768:])
    corr = torch.corrcoef(torch.stack([pred[:, 0], errors[768:, 0].log()]))[0, 1]
    assert corr > 0.95
    with pytest.raises(ValueError, match="class labels"):
        phi(x[:4])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        phi(x[:2], torch.tensor([-1, 3]))
    blind = fit_error_predictor(x[:64], errors[:64], NFES, input_scale=1 / 80, steps=5)
    with pytest.raises(ValueError, match="no labels"):
        blind(x[:4], labels[:4])


@pytest.mark.parametrize("budget", [3.5, 5.0, 6.2])
def test_online_chooser_tracks_the_budget_and_matches_the_offline_allocation(budget: float) -> None:
    """A stream of 2048 samples, 8 per call: the running mean NFE meets the budget (the price adapts even when
    the stream is harder than the calibration set), and the choices mostly agree with :func:`allocate`
    seeing all of it at once."""
    g = torch.Generator().manual_seed(3)
    def planted(n: int, hardness: float) -> torch.Tensor:
        base = torch.rand(n, 1, generator=g, dtype=torch.float64) * hardness + 0.05
        steepness = 1 + torch.rand(n, 1, generator=g)
        return base * torch.tensor([1.0, 0.45, 0.15], dtype=torch.float64) ** steepness
    calibration, stream = planted(512, 1.0), planted(2048, 1.6)
    chooser = NFEChooser(lambda s, _: s, NFES, budget, calibration)
    picks = torch.tensor([NFES.index(n) for block in stream.split(8) for n in chooser(block)])
    mean_nfe = float(torch.tensor(NFES, dtype=torch.float64)[picks].mean())
    assert abs(mean_nfe - budget) < 0.05
    offline = allocate(stream, NFES, budget)
    assert float((picks == offline).double().mean()) > 0.8
    err = float(stream[torch.arange(len(picks)), picks].mean())
    assert err < blind_mix(stream, NFES, mean_nfe)  # beats every fixed-NFE strategy at its cost
