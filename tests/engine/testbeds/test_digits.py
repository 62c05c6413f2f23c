"""Digits backbones (EDM UNet, DiT), classifier, Frechet distance and the shipped weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from indis.engine.testbeds import digits as d

KINDS = ("unet", "dit")
TINY = {"unet": dict(channels=(8, 16, 16), num_blocks=1, emb_dim=32, heads=2),
        "dit": dict(width=32, depth=2, heads=2)}


@pytest.fixture(scope="module", params=KINDS)
def backbone(request: pytest.FixtureRequest) -> d.EDMDenoiser:
    return d.load_backbone(request.param)


def _cases(b: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sigma = torch.exp(torch.linspace(np.log(0.002), np.log(80.0), b))
    noise = torch.randn(b, 1, 8, 8, generator=g)
    x = d.load_digits_images("test")[0][:b] + sigma[:, None, None, None] * noise
    labels = torch.tensor([3, -1, 7, 0, -1, 9])[:b]
    return x, sigma, labels


# ------------------------------------------------------------------------------------------- data
def test_data_split_is_fixed_and_disjoint() -> None:
    tr, ytr = d.load_digits_images("train")
    te, yte = d.load_digits_images("test")
    al, yal = d.load_digits_images("all")
    assert tr.shape == (1500, 1, 8, 8) and te.shape == (297, 1, 8, 8) and al.shape == (1797, 1, 8, 8)
    assert tr.dtype == torch.float32 and al.min() == -1 and al.max() == 1
    assert torch.equal(torch.cat([tr, te]), al) and torch.equal(torch.cat([ytr, yte]), yal)
    assert d.load_digits_images("test", size=16)[0].shape == (297, 1, 16, 16)
    with pytest.raises(ValueError, match="split"):
        d.load_digits_images("val")  # type: ignore[arg-type]


# ------------------------------------------------------------------------- denoiser convention
def test_per_sample_sigma_and_shapes(backbone: d.EDMDenoiser) -> None:
    x, sigma, labels = _cases()
    out = backbone(x, sigma)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    for i in range(x.shape[0]):  # sample i uses its own sigma_i
        single = backbone(x, sigma[i])  # scalar broadcast to the batch
        torch.testing.assert_close(out[i], single[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(backbone(x, sigma.reshape(-1, 1, 1, 1)), out, atol=0, rtol=0)
    torch.testing.assert_close(backbone(x, float(sigma[2]))[2], out[2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sigma"):
        backbone(x, sigma[:3])


def test_batch_invariance(backbone: d.EDMDenoiser) -> None:
    x, sigma, labels = _cases()
    batch = backbone(x, sigma, class_labels=labels)
    for i in range(x.shape[0]):
        alone = backbone(x[i:i + 1], sigma[i:i + 1], class_labels=labels[i:i + 1])
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=0)
    # a sample's output ignores its batch mates (permuted batch)
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    torch.testing.assert_close(backbone(x[perm], sigma[perm], labels[perm]), batch[perm], atol=1e-5, rtol=0)


def test_class_labels_null_and_conditioning(backbone: d.EDMDenoiser) -> None:
    x, sigma, _ = _cases()
    s = torch.full_like(sigma, 2.0)
    uncond = backbone(x, s)
    torch.testing.assert_close(backbone(x, s, class_labels=torch.full((6,), -1)), uncond, atol=0, rtol=0)
    torch.testing.assert_close(backbone(x, s, class_labels=-1), uncond, atol=0, rtol=0)
    assert (backbone(x, s, class_labels=torch.full((6,), 4)) - uncond).abs().max() > 1e-3
    with pytest.raises(ValueError, match="class_labels"):
        backbone(x, s, class_labels=torch.full((6,), 10))


@pytest.mark.parametrize("kind", KINDS)
def test_edm_preconditioning_identity(kind: str) -> None:
    """D = c_skip x + c_out F (Karras et al. 2022 coefficients); c_skip -> 1, c_out -> 0 as sigma -> 0."""
    model = d.load_backbone(kind)  # type: ignore[arg-type]
    x = d.load_digits_images("test")[0][:4]
    for s in (0.0, 1e-7):
        torch.testing.assert_close(model(x, torch.full((4,), s)), x, atol=2e-6, rtol=0)

    class Probe(d.EDMDenoiser):
        sigma_data, num_classes = 0.5, 10

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

        def raw(self, xin: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            self.seen = (xin, c_noise)
            return self.w * torch.ones_like(xin)

    probe, sd = Probe(), 0.5
    xs = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    sig = torch.tensor([0.01, 0.5, 80.0], dtype=torch.float64)
    out = probe(xs, sig)
    v = sig[:, None, None, None]
    expect = sd**2 / (v**2 + sd**2) * xs + v * sd / (v**2 + sd**2).sqrt()
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(probe.seen[0], xs / (v**2 + sd**2).sqrt())
    torch.testing.assert_close(probe.seen[1], sig.log() / 4)


@pytest.mark.parametrize("kind", KINDS)
def test_float64_and_gradients_in_x_and_sigma(kind: str) -> None:
    model = d.load_backbone(kind, dtype=torch.float64)  # type: ignore[arg-type]
    x, sigma, labels = _cases(2)
    x64, s64 = x.double().requires_grad_(True), sigma.double().clamp_min(0.1).requires_grad_(True)
    out = model(x64, s64, class_labels=labels)
    assert out.dtype == torch.float64
    out32 = d.load_backbone(kind)(x, s64.detach().float(), class_labels=labels)  # type: ignore[arg-type]
    torch.testing.assert_close(out.detach().float(), out32, atol=1e-4, rtol=1e-4)
    gx, gs = torch.autograd.grad(out.square().sum(), (x64, s64))
    assert torch.isfinite(gx).all() and torch.isfinite(gs).all() and (gs != 0).all()
    small = (x64[:1].detach().clone().requires_grad_(True), s64[:1].detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, s: model(a, s), small, eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------- shipped weights
def test_shipped_weights_metadata() -> None:
    for name in ("unet", "dit", "classifier"):
        meta = json.loads((d.WEIGHTS_DIR / f"digits_{name}.json").read_text())
        for key in ("arch", "train", "steps", "wall_time_s", "final_loss", "data", "torch_version", "params"):
            assert key in meta, (name, key)
    model = d.load_backbone("unet")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert d.count_params(model) == model.metadata["params"]
    total = sum(p.stat().st_size for p in d.WEIGHTS_DIR.glob("digits_*"))
    assert total < 8 * 2**20


# Measured with the shipped weights, 400 samples, 30 iPNDM steps, FD to all 1797 images in classifier
# features: UNet 5.4 / 6.6 / 10.7 and DiT 12.3 / 13.4 / 17.9 for seeds 0 / 7 / 123 (small-sample spread);
# a broken sampler or model is far above: 3-step Euler gives 80 (UNet) / 106 (DiT), N(0, I) noise 240.
# For reference, the held-out test split vs the train split is 6.6 (297 vs 1500).
FD_LIMIT = {"unet": 20.0, "dit": 30.0}


@pytest.mark.parametrize("kind", KINDS)
def test_samples_are_close_to_data(kind: str) -> None:
    model = d.load_backbone(kind)  # type: ignore[arg-type]
    xs = d.sample_backbone(model, 400, steps=30, solver="ipndm", seed=123)
    assert xs.shape == (400, 1, 8, 8) and torch.isfinite(xs).all()
    assert d.fd_to_data(xs, "all") < FD_LIMIT[kind]
    assert d.fd_to_data(torch.randn(400, 1, 8, 8), "all") > 4 * FD_LIMIT[kind]  # the metric separates noise


def test_classifier_accuracy() -> None:
    assert d.classifier_accuracy() >= 0.95
    feats = d.classifier_features(d.load_digits_images("test")[0][:5])
    assert feats.shape == (5, d.load_classifier().config["feature_dim"])


# ------------------------------------------------------------------------------------------- FD
def test_frechet_distance_properties() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16))
    b = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.3 + 0.5
    assert d.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert d.frechet_distance(a, b) == pytest.approx(d.frechet_distance(b, a), rel=1e-8)
    assert d.frechet_distance(a, a + 1.0) == pytest.approx(16.0, rel=1e-8)  # mean shift only
    assert d.frechet_distance(torch.as_tensor(a), b) > 0
    # scaling: C_c = 4 C_a, so (C_a C_c)^(1/2) = 2 C_a and FD = |mu_a|^2 + tr(C_a)
    c = a * 2.0
    ca = np.cov(a, rowvar=False)
    assert d.frechet_distance(a, c) == pytest.approx((a.mean(0) ** 2).sum() + np.trace(ca), rel=1e-8)
    with pytest.raises(ValueError):
        d.frechet_distance(a, b[:, :3])


# -------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", KINDS)
def test_short_training_reduces_loss_and_round_trips(kind: str, tmp_path) -> None:
    torch.set_num_threads(2)
    model, rec = d.train_backbone(kind, steps=40, arch=TINY[kind], progress=False,  # type: ignore[arg-type]
                                  batch_size=32, warmup=5, lr=3e-3, ema_decay=0.9)
    assert rec["eval_loss_test_uncond"] < 0.8 * rec["eval_loss_test_initial"]
    d.save_model(kind, model, rec, tmp_path)
    back = d.load_backbone(kind, weights_dir=tmp_path)  # type: ignore[arg-type]
    x, sigma, labels = _cases()
    torch.testing.assert_close(back(x, sigma, labels), model(x, sigma, labels), atol=0, rtol=0)
    again, _ = d.train_backbone(kind, steps=3, arch=TINY[kind], progress=False,  # type: ignore[arg-type]
                                batch_size=32)
    twice, _ = d.train_backbone(kind, steps=3, arch=TINY[kind], progress=False,  # type: ignore[arg-type]
                                batch_size=32)
    for p, q in zip(again.parameters(), twice.parameters(), strict=True):  # seeded: bit-identical
        assert torch.equal(p, q)


def test_missing_weights_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="run python -m indis.engine.studies.train_digits train"):
        d.load_backbone("dit", weights_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="run python -m indis.engine.studies.train_digits train"):
        d.load_classifier(tmp_path / "nothing")
    with pytest.raises(ValueError, match="kind"):
        d.load_backbone("vae")  # type: ignore[arg-type]


def test_shipped_weights_match_the_architecture() -> None:
    from safetensors.torch import load_file

    shipped = load_file(str(d.WEIGHTS_DIR / "digits_unet.safetensors"))
    assert shipped.keys() == d.load_backbone("unet").state_dict().keys()
