"""Tests for the analytic testbeds (exact GMM denoisers, edm2 tree, digits, reference PF-ODE solve)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from indis.engine.testbeds.mixtures import GaussianMixture, digits_mixture, reference_solve, tree_mixture

SIGMAS = [0.002, 0.03, 0.5, 3.0, 80.0, 1e4]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_spd(k: int, d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(k, d, d, generator=gen, dtype=torch.float64)
    return a @ a.transpose(1, 2) / d + 0.05 * torch.eye(d, dtype=torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.fixture(scope="module")
def tree() -> GaussianMixture:
    return tree_mixture()


# ----------------------------------------------------------------------------- GaussianMixture denoiser


def test_single_gaussian_matches_closed_form() -> None:
    gen = _gen(0)
    d = 3
    mu = torch.randn(1, d, generator=gen, dtype=torch.float64)
    cov = _random_spd(1, d, gen)
    gmm = GaussianMixture(mu, cov)
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    x = mu + sigma[:, None] * torch.randn(len(SIGMAS), d, generator=gen, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    expected = torch.stack([mu[0] + cov[0] @ torch.linalg.solve(cov[0] + s**2 * eye, xi - mu[0])
                            for xi, s in zip(x, sigma, strict=True)])
    got = gmm(x, sigma)
    for i in range(len(SIGMAS)):
        assert _rel(got[i], expected[i]) < 1e-12


def test_two_component_1d_matches_quadrature() -> None:
    means, var, w = np.array([-1.0, 0.5]), np.array([0.04, 0.25]), np.array([0.3, 0.7])
    gmm = GaussianMixture(torch.tensor(means)[:, None], torch.tensor(var), weights=torch.tensor(w))

    def prior(t: float) -> float:
        return float(np.sum(w * np.exp(-0.5 * (t - means) ** 2 / var) / np.sqrt(2 * np.pi * var)))

    cases = [(-1.1, 0.05), (0.2, 0.05), (-0.3, 0.5), (0.8, 0.5), (2.0, 3.0), (-4.0, 3.0)]
    for x, s in cases:
        def lik(t: float, x: float = x, s: float = s) -> float:
            return prior(t) * math.exp(-0.5 * ((x - t) / s) ** 2)

        opts = dict(points=[-1.0, 0.5, x], limit=500, epsabs=0.0, epsrel=1e-13)
        num = quad(lambda t: t * lik(t), -12.0, 12.0, **opts)[0]
        den = quad(lik, -12.0, 12.0, **opts)[0]
        got = gmm(torch.tensor([[x]], dtype=torch.float64), torch.tensor([s], dtype=torch.float64))
        assert abs(float(got) - num / den) < 1e-10 * max(1.0, abs(num / den))


def test_isotropic_and_full_paths_agree() -> None:
    gen = _gen(1)
    k, d = 5, 4
    mu = 2 * torch.randn(k, d, generator=gen, dtype=torch.float64)
    c = torch.rand(k, generator=gen, dtype=torch.float64) + 0.01
    w = torch.rand(k, generator=gen, dtype=torch.float64)
    iso = GaussianMixture(mu, c, weights=w)
    full = GaussianMixture(mu, c[:, None, None] * torch.eye(d, dtype=torch.float64), weights=w)
    assert iso.is_isotropic and not full.is_isotropic
    sigma = torch.tensor(SIGMAS * 2, dtype=torch.float64)
    x = iso.sample(len(sigma), _gen(2)) + sigma[:, None] * torch.randn(len(sigma), d, generator=gen,
                                                                       dtype=torch.float64)
    assert _rel(iso(x, sigma), full(x, sigma)) < 1e-12
    assert _rel(iso.log_prob(x, sigma), full.log_prob(x, sigma)) < 1e-12


@pytest.mark.parametrize("isotropic", [True, False])
def test_tweedie_autograd(isotropic: bool, tree: GaussianMixture) -> None:
    """D(x) = x + sigma^2 * grad log p_sigma(x): an independent route through log_prob."""
    if isotropic:
        gen = _gen(3)
        gmm = GaussianMixture(torch.randn(7, 6, generator=gen, dtype=torch.float64),
                              torch.rand(7, generator=gen, dtype=torch.float64) * 0.1 + 0.01, shape=(2, 3))
    else:
        gmm = tree
    sigma = torch.tensor([0.01, 0.05, 0.3, 2.0, 10.0], dtype=torch.float64)
    x0 = gmm.sample(len(sigma), _gen(4))
    x = (x0 + sigma.view(-1, *[1] * (x0.ndim - 1)) * torch.randn(x0.shape, generator=_gen(5),
                                                                dtype=torch.float64)).requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(x, sigma).sum(), x)
    tweedie = x.detach() + sigma.view(-1, *[1] * (x0.ndim - 1)) ** 2 * grad
    assert _rel(gmm(x.detach(), sigma), tweedie) < 1e-10


def test_class_labels_restrict_components() -> None:
    gen = _gen(6)
    mu = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    var = torch.rand(6, generator=gen, dtype=torch.float64) * 0.2 + 0.05
    w = torch.rand(6, generator=gen, dtype=torch.float64)
    cls = torch.tensor([0, 1, 0, 2, 1, 0])
    gmm = GaussianMixture(mu, var, weights=w, component_class=cls)
    x = 0.7 * torch.randn(6, 2, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.3, 1.0, 0.1, 0.3, 1.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    got = gmm(x, sigma, class_labels=labels)
    for i, lab in enumerate(labels.tolist()):
        sel = cls == lab
        sub = GaussianMixture(mu[sel], var[sel], weights=w[sel])
        assert _rel(got[i], sub(x[i:i + 1], sigma[i:i + 1])[0]) < 1e-13
    # an int label broadcasts; labels change the answer; sampling respects the class
    ones = torch.ones(6, dtype=torch.long)
    assert _rel(gmm(x, sigma, class_labels=1), gmm(x, sigma, class_labels=ones)) == 0
    assert _rel(got, gmm(x, sigma)) > 1e-3
    assert _rel(gmm.weights(0), w * (cls == 0) / (w * (cls == 0)).sum()) < 1e-14
    with pytest.raises(ValueError):
        GaussianMixture(mu, var)(x, sigma, class_labels=labels)
    with pytest.raises(ValueError):
        gmm(x, sigma, class_labels=torch.full((6,), 5))


@pytest.mark.parametrize("isotropic", [True, False])
def test_batch_invariance_per_sample_sigma(isotropic: bool) -> None:
    gen = _gen(7)
    k, shape = 9, (1, 2, 2)
    mu = torch.randn(k, 4, generator=gen, dtype=torch.float64)
    if isotropic:
        cov = torch.rand(k, generator=gen, dtype=torch.float64) * 0.1 + 0.01
    else:
        cov = _random_spd(k, 4, gen)
    gmm = GaussianMixture(mu, cov, shape=shape, component_class=torch.arange(k) % 3)
    sigma = torch.tensor(SIGMAS + [0.1, 7.0], dtype=torch.float64)
    noise = torch.randn(len(sigma), *shape, generator=gen, dtype=torch.float64)
    x = gmm.sample(len(sigma), _gen(8)) + sigma.view(-1, 1, 1, 1) * noise
    labels = torch.arange(len(sigma)) % 3
    for cl in (None, labels):
        batch = gmm(x, sigma, class_labels=cl)
        single = torch.cat([gmm(x[i:i + 1], sigma[i:i + 1], class_labels=None if cl is None else cl[i:i + 1])
                            for i in range(len(sigma))])
        assert (batch - single).abs().max() <= 1e-14 * max(1.0, float(single.abs().max()))


def test_full_covariance_chunking_is_invisible(tree: GaussianMixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import indis.engine.testbeds.mixtures as tb

    x = tree.sample(50, _gen(9)) + 0.1 * torch.randn(50, 2, generator=_gen(10), dtype=torch.float64)
    sigma = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    ref = tree(x, sigma)
    monkeypatch.setattr(tb, "_FULL_CHUNK_ELEMS", tree.num_components * 2 * 7)  # chunks of 7 rows
    assert (tree(x, sigma) - ref).abs().max() <= 1e-15


def test_dtype_and_shape_preserved(tree: GaussianMixture) -> None:
    x64 = tree.sample(16, _gen(11)) + 0.2 * torch.randn(16, 2, generator=_gen(12), dtype=torch.float64)
    x32 = x64.float()
    s32 = torch.full((16,), 0.2)
    out32 = tree(x32, s32)
    assert out32.dtype == torch.float32 and out32.shape == x32.shape
    assert torch.allclose(out32.double(), tree(x32.double(), s32.double()), atol=1e-6)
    assert tree(x64, 0.2).dtype == torch.float64  # scalar sigma broadcasts
    with pytest.raises(ValueError):
        tree(torch.zeros(3, 3), torch.ones(3))


def test_small_and_huge_sigma_limits(tree: GaussianMixture) -> None:
    x = tree.sample(64, _gen(13))
    small = tree(x, torch.full((64,), 1e-5, dtype=torch.float64))
    assert (small - x).abs().max() < 1e-6  # D(x) = x - sigma^2 * score -> x
    far = torch.randn(64, 2, generator=_gen(14), dtype=torch.float64) * 1e6
    huge = tree(far, torch.full((64,), 1e6, dtype=torch.float64))
    assert (huge - tree.mean()).abs().max() < 1e-6  # posterior -> prior mean


def test_sample_moments() -> None:
    gen = _gen(15)
    mu = torch.tensor([[0.0, 0.0], [3.0, -1.0]], dtype=torch.float64)
    cov = _random_spd(2, 2, gen)
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    gmm = GaussianMixture(mu, cov, weights=w)
    xs = gmm.sample(200_000, _gen(16))
    assert xs.dtype == torch.float64
    mean = w @ mu
    second = (w[:, None, None] * (cov + mu[:, :, None] * mu[:, None, :])).sum(0)
    assert (xs.mean(0) - mean).abs().max() < 0.02
    assert ((xs.T @ xs) / len(xs) - second).abs().max() < 0.05


# ----------------------------------------------------------------------------- tree and digits


def test_tree_mixture_structure(tree: GaussianMixture) -> None:
    a, b = tree_mixture(0), tree_mixture(1)
    assert tree.shape == (2,) and tree.dim == 2 and not tree.is_isotropic
    assert a.num_components == b.num_components == 8 * (2**7 - 1)
    assert tree.num_components == 2 * 8 * (2**7 - 1)
    for g in (tree, a, b):
        assert abs(float(g.weights().sum()) - 1.0) < 1e-12
    assert a.component_class is not None and b.component_class is not None
    assert set(a.component_class.tolist()) == {0} and set(b.component_class.tolist()) == {1}
    assert torch.equal(tree.means, torch.cat([a.means, b.means]))  # same random draws whatever the class
    assert tree_mixture(depth=3).num_components == 2 * 8 * 7
    # first branch of class A: 8 components along 45 degrees from the edm2 origin
    steps = (a.means[1:8] - a.means[:7]) / torch.tensor([1.3136, 1.3844], dtype=torch.float64)
    assert torch.allclose(steps[:, 0], steps[:, 1]) and (steps > 0).all()
    # classes are mirror-ish: A grows towards +x+y, B towards -x-y
    assert float(a.mean().sum()) > 0.3 and float(b.mean().sum()) < -0.3
    xs = tree.sample(20_000, _gen(17))
    assert xs.abs().max() < 1.6  # edm2 plots this distribution in [-1.6, 1.6]^2
    # class-conditional denoising of the joint tree equals the single-class tree
    x = xs[:32] + 0.3 * torch.randn(32, 2, generator=_gen(18), dtype=torch.float64)
    sigma = torch.full((32,), 0.3, dtype=torch.float64)
    assert _rel(tree(x, sigma, class_labels=0), a(x, sigma)) < 1e-12
    assert _rel(tree(x, sigma, class_labels=1), b(x, sigma)) < 1e-12
    with pytest.raises(ValueError):
        tree_mixture(2)


def test_digits_mixture() -> None:
    g = digits_mixture()
    assert g.shape == (1, 8, 8) and g.num_components == 1797 and g.is_isotropic
    assert float(g.means.min()) == -1.0 and float(g.means.max()) == 1.0
    assert g.component_class is not None and set(g.component_class.tolist()) == set(range(10))
    g16 = digits_mixture(16, n_images=100, variance=2e-3)
    assert g16.shape == (1, 16, 16) and g16.num_components == 100
    assert g16.means.min() >= -1.0 and g16.means.max() <= 1.0
    assert torch.allclose(g16.variances, torch.full((100,), 2e-3, dtype=torch.float64))
    xs = g16.sample(8, _gen(19), class_labels=3)
    assert xs.shape == (8, 1, 16, 16)
    # at small sigma only the own image's component counts: D = (v x + sigma^2 mu) / (v + sigma^2)
    clean = g16.means[:8].reshape(8, 1, 16, 16)
    x = clean + 0.01 * torch.randn(clean.shape, generator=_gen(20), dtype=torch.float64)
    out = g16(x, torch.full((8,), 0.01, dtype=torch.float64))
    assert _rel(out, (2e-3 * x + 1e-4 * clean) / (2e-3 + 1e-4)) < 1e-10


# ----------------------------------------------------------------------------- reference_solve


@pytest.mark.parametrize("sigma_min", [0.002, 0.0])
def test_reference_solve_single_gaussian_closed_form(sigma_min: float) -> None:
    """PF-ODE for N(mu, C): x(sigma) = mu + Q diag(sqrt((lam + s^2) / (lam + s_max^2))) Q^T (x_T - mu)."""
    gen = _gen(21)
    d, sigma_max = 3, 80.0
    mu = torch.randn(1, d, generator=gen, dtype=torch.float64)
    for cov in (torch.tensor([0.25], dtype=torch.float64), _random_spd(1, d, gen)):
        gmm = GaussianMixture(mu, cov)
        x_t = mu + sigma_max * torch.randn(4, d, generator=gen, dtype=torch.float64)
        c = cov[0] * torch.eye(d, dtype=torch.float64) if cov.ndim == 1 else cov[0]
        lam, q = torch.linalg.eigh(c)
        factor = ((lam + sigma_min**2) / (lam + sigma_max**2)).sqrt()
        expected = mu + (x_t - mu) @ q @ torch.diag(factor) @ q.T
        got = reference_solve(gmm, x_t, sigma_max, sigma_min)
        assert got.dtype == torch.float64 and got.shape == x_t.shape
        assert _rel(got, expected) <= 1e-10


def test_reference_solve_gmm_tolerances_agree_and_lands_on_class(tree: GaussianMixture) -> None:
    x0 = tree.sample(6, _gen(22), class_labels=0)
    x_t = x0 + 80.0 * torch.randn(6, 2, generator=_gen(23), dtype=torch.float64)
    labels = torch.zeros(6, dtype=torch.long)
    tight = reference_solve(tree, x_t, 80.0, 0.0, cond={"class_labels": labels})
    tighter = reference_solve(tree, x_t, 80.0, 0.0, rtol=1e-13, atol=1e-13, cond={"class_labels": labels})
    assert (tight - tighter).abs().max() < 1e-10
    # the end point is a sample of class A: high density under A, negligible under B
    assert (tree.log_prob(tight, 0.0, class_labels=0) > tree.log_prob(tight, 0.0, class_labels=1) + 10).all()
    assert (tree.log_prob(tight, 0.0, class_labels=0) > 0).all()


def test_reference_solve_round_trip(tree: GaussianMixture) -> None:
    x_t = tree.sample(4, _gen(24)) + 5.0 * torch.randn(4, 2, generator=_gen(25), dtype=torch.float64)
    down = reference_solve(tree, x_t, 5.0, 0.05)
    back = reference_solve(tree, down, 0.05, 5.0)  # sigma_min > sigma_max integrates in the noising direction
    assert (back - x_t).abs().max() < 1e-9 * float(x_t.abs().max())
    assert torch.equal(reference_solve(tree, x_t, 5.0, 5.0), x_t)


def test_reference_solve_validation(tree: GaussianMixture) -> None:
    x = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="finite"):
        reference_solve(tree, x, math.inf)
    with pytest.raises(ValueError):
        reference_solve(tree, x, 1.0, -0.1)


def test_denoise_scaled_equals_ve_denoiser_and_handles_alpha_zero() -> None:
    """E[x0 | y], y = alpha x0 + s eps, is the VE denoiser at (y/alpha, s/alpha); alpha = 0: prior mean."""
    g = torch.Generator().manual_seed(11)
    for gm in (GaussianMixture(torch.randn(3, 4, generator=g, dtype=torch.float64),
                               torch.tensor([0.05, 0.2, 0.5], dtype=torch.float64)),
               tree_mixture(class_label=0)):
        y = torch.randn(5, gm.dim, generator=g, dtype=torch.float64)
        alpha = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.0], dtype=torch.float64)
        s = torch.tensor([0.01, 0.3, 0.5, 0.9, 1.0], dtype=torch.float64)
        out = gm.denoise_scaled(y, alpha, s)
        ve = gm(y[:4] / alpha[:4, None], s[:4] / alpha[:4])
        torch.testing.assert_close(out[:4], ve, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out[4], gm.mean(), rtol=1e-12, atol=1e-12)
