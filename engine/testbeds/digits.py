"""Small learned backbones on sklearn's 8x8 digits, trained by the project, plus a classifier for FD.

* :func:`load_digits_images` -- the data in [-1, 1] with a fixed train/test split (last 297 images = test).
* :class:`DigitsUNet` and :class:`DigitsDiT` -- EDM-preconditioned denoisers (Karras et al. 2022, "Elucidating
  the Design Space of Diffusion-Based Generative Models"), the DiT following Peebles & Xie 2023 ("Scalable
  Diffusion Models with Transformers", adaLN-Zero). Both follow the k-diffusion convention
  ``model(x, sigma[B], class_labels=None) -> denoised x0`` with per-sample sigma, use only GroupNorm /
  LayerNorm (batch invariant) and are differentiable in ``x`` and ``sigma`` in float32 and float64.
* :class:`DigitsClassifier` -- a small CNN whose penultimate layer gives features for a Frechet distance
  (:func:`frechet_distance`, :func:`fd_to_data`): standard FID needs Inception weights we cannot download.
* :func:`load_backbone` / :func:`load_classifier` -- the shipped weights in ``weights/`` (safetensors + JSON).

Training and the check of the shipped weights run from ``python -m indis.engine.studies.train_digits``.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from indis.engine.core.checkpoints import check_shapes, checkpoint_file, state_checksum, stored_tensors
from indis.engine.tuning.teacher import noise_from_seeds

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"  # package data of indis.engine
SHIPPED_HEADS = WEIGHTS_DIR / "indis"  # the INDIS schedule heads for the digits UNet
N_TEST = 297  # the last 297 of sklearn's 1797 digits are the held-out test split
SIGMA_DATA = 0.5
Split = Literal["train", "test", "all"]
BackboneKind = Literal["unet", "dit"]


# ============================================================================================ data
@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    return images, torch.as_tensor(data.target, dtype=torch.long)


def load_digits_images(split: Split = "train", size: int = 8) -> tuple[Tensor, Tensor]:
    """sklearn digits as ``(images [n, 1, size, size] float32 in [-1, 1], labels [n] long)``.

    The split is fixed: ``test`` is the last 297 images, ``train`` the first 1500, ``all`` all 1797. For
    ``size != 8`` the images are bilinearly resized (``align_corners=False``), as in
    ``testbeds.digits_mixture``.
    """
    images, labels = _raw_digits()
    n_train = images.shape[0] - N_TEST
    if split == "train":
        images, labels = images[:n_train], labels[:n_train]
    elif split == "test":
        images, labels = images[n_train:], labels[n_train:]
    elif split != "all":
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clone(), labels.clone()


# ================================================================================ EDM preconditioning
def _per_sample_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """``sigma`` (scalar, ``[B]`` or any shape with B elements) as ``[B]`` in ``x``'s dtype and device."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.numel() == 1:
        return s.reshape(1).expand(x.shape[0])
    if s.numel() != x.shape[0]:
        raise ValueError(f"sigma must be a scalar or have one value per sample ({x.shape[0]}), "
                         f"got shape {tuple(s.shape)}")
    return s.reshape(x.shape[0])


def _labels(class_labels: Tensor | int | None, batch: int, num_classes: int, device: torch.device) -> Tensor:
    """Class indices ``[B]``; ``None`` or a negative label selects the null class (index ``num_classes``)."""
    if class_labels is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    y = torch.as_tensor(class_labels, device=device).long().reshape(-1)
    if y.numel() == 1:
        y = y.expand(batch)
    if y.numel() != batch:
        raise ValueError(f"class_labels must have one label per sample ({batch}), got {y.numel()}")
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()  # ONNX export: no data-dependent check
    if not tracing and (y >= num_classes).any():
        raise ValueError(f"class_labels must be < num_classes = {num_classes} (negative = unconditional)")
    return torch.where(y < 0, torch.full_like(y, num_classes), y)


class EDMDenoiser(nn.Module):
    """EDM preconditioning (Karras et al. 2022, Table 1) around a raw network ``F(c_in x, c_noise, label)``.

    ``D(x, sigma) = c_skip x + c_out F`` with ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``,
    ``c_in = 1/sqrt(s^2+sd^2)``, ``c_noise = ln(s)/4``. Computation runs in the parameters' dtype; the result
    is returned in ``x``'s dtype. ``sigma = 0`` is allowed (``c_noise`` uses ``max(sigma, 1e-20)``).
    """

    sigma_data: float
    num_classes: int

    def raw(self, x: Tensor, c_noise: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | int | None = None) -> Tensor:
        dtype = next(self.parameters()).dtype
        s = _per_sample_sigma(sigma, x).to(dtype)
        xin = x.to(dtype)
        sd = self.sigma_data
        norm = (s * s + sd * sd).rsqrt()
        c_skip, c_out, c_in = sd * sd * norm * norm, s * sd * norm, norm
        c_noise = s.clamp_min(1e-20).log() / 4
        view = (-1,) + (1,) * (x.ndim - 1)
        labels = _labels(class_labels, x.shape[0], self.num_classes, x.device)
        f = self.raw(xin * c_in.reshape(view), c_noise, labels)
        return (c_skip.reshape(view) * xin + c_out.reshape(view) * f).to(x.dtype)


class NoiseEmbedding(nn.Module):
    """Sin/cos features of ``c_noise`` at fixed log-spaced frequencies (0.25 ... 64 rad per unit)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        freqs = torch.exp(torch.linspace(math.log(0.25), math.log(64.0), dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c_noise: Tensor) -> Tensor:
        ang = c_noise[:, None] * self.freqs.to(c_noise.dtype)
        return torch.cat([ang.cos(), ang.sin()], dim=1)


class CondEmbedding(nn.Module):
    """Noise-level MLP plus a label embedding with a null class at index ``num_classes``."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.noise = NoiseEmbedding(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(num_classes + 1, dim)

    def forward(self, c_noise: Tensor, labels: Tensor) -> Tensor:
        return self.mlp(self.noise(c_noise)) + self.label(labels)


# ============================================================================================== UNet
def _groups(ch: int) -> int:
    return math.gcd(8, ch)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block with an adaptive (scale, shift) GroupNorm from the embedding."""

    def __init__(self, cin: int, cout: int, emb_dim: int, attn: bool, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = Attention2d(cout, heads) if attn else None
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(self.drop(F.silu(self.norm2(h) * (1 + scale) + shift)))
        h = h + self.skip(x)
        return h if self.attn is None else self.attn(h)


class Attention2d(nn.Module):
    """Multi-head self-attention over the pixels of one image (residual, zero-initialised output)."""

    def __init__(self, ch: int, heads: int) -> None:
        super().__init__()
        if heads < 1 or ch % heads:
            raise ValueError(f"heads={heads} must be >= 1 and divide the channels ({ch})")
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c/heads]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class DigitsUNet(EDMDenoiser):
    """Small EDM-preconditioned UNet (Karras et al. 2022) for 8x8 digits: 8x8 -> 4x4 -> 2x2.

    ``channels`` per resolution, ``num_blocks`` residual blocks per level (decoder: one more), attention at
    the levels in ``attn_levels`` and in the middle. ``num_classes`` labels plus a null class.
    """

    def __init__(self, img_resolution: int = 8, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64),
                 num_blocks: int = 1, attn_levels: Sequence[int] = (2,), emb_dim: int = 128, heads: int = 4,
                 num_classes: int = 10, dropout: float = 0.0, sigma_data: float = SIGMA_DATA) -> None:
        super().__init__()
        self.sigma_data, self.num_classes = float(sigma_data), int(num_classes)
        self.config = dict(img_resolution=img_resolution, in_channels=in_channels, channels=list(channels),
                           num_blocks=num_blocks, attn_levels=list(attn_levels), emb_dim=emb_dim, heads=heads,
                           num_classes=num_classes, dropout=dropout, sigma_data=float(sigma_data))
        self.cond = CondEmbedding(emb_dim, num_classes)
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)

        def block(cin: int, cout: int, level: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, level in attn_levels, heads, dropout)

        self.down, skip_ch, c = nn.ModuleList(), [channels[0]], channels[0]
        for level, ch in enumerate(channels):
            for _ in range(num_blocks):
                self.down.append(block(c, ch, level))
                c = ch
                skip_ch.append(c)
            if level < len(channels) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skip_ch.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, True, heads, dropout),
                                  ResBlock(c, c, emb_dim, False, heads, dropout)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(channels))):
            for _ in range(num_blocks + 1):
                self.up.append(block(c + skip_ch.pop(), channels[level], level))
                c = channels[level]
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, c, 3, padding=1)))
        self.out_norm, self.out_conv = nn.GroupNorm(_groups(c), c), nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def raw(self, x: Tensor, c_noise: Tensor, labels: Tensor) -> Tensor:
        emb = F.silu(self.cond(c_noise, labels))
        h = self.stem(x)
        skips = [h]
        for m in self.down:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
            skips.append(h)
        for m in self.mid:
            h = m(h, emb)
        for m in self.up:
            h = m(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(m, ResBlock) else m(h)
        return self.out_conv(F.silu(self.out_norm(h)))


# =============================================================================================== DiT
def _sincos_2d(width: int, grid: int) -> Tensor:
    """Fixed 2-D sin/cos position embedding ``[grid*grid, width]`` (half the channels per axis)."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        ang = pos[:, None] * omega[None]
        parts += [ang.sin(), ang.cos()]
    return torch.cat(parts, dim=1).float()


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Peebles & Xie 2023): gates start at zero."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, width))
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        b, t, w = x.shape
        qkv = self.qkv(_modulate(self.norm1(x), sh1, sc1)).reshape(b, t, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, w)
        x = x + g1[:, None] * self.proj(a)
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), sh2, sc2))


class DigitsDiT(EDMDenoiser):
    """Small DiT (Peebles & Xie 2023) with EDM preconditioning (Karras et al. 2022).

    Patch size 2 on 8x8 gives 16 tokens; ``depth`` adaLN-Zero blocks of ``width`` channels conditioned on
    the noise level plus the class (null class when unlabelled); zero-initialised final layer.
    """

    def __init__(self, img_resolution: int = 8, in_channels: int = 1, patch_size: int = 2, width: int = 96,
                 depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0, num_classes: int = 10,
                 sigma_data: float = SIGMA_DATA) -> None:
        super().__init__()
        if img_resolution % patch_size or width % 4 or width % heads:
            raise ValueError("img_resolution must be a multiple of patch_size; width of 4 and heads")
        self.sigma_data, self.num_classes = float(sigma_data), int(num_classes)
        self.config = dict(img_resolution=img_resolution, in_channels=in_channels, patch_size=patch_size,
                           width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes, sigma_data=float(sigma_data))
        self.p, self.grid, self.cin = patch_size, img_resolution // patch_size, in_channels
        self.patch = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.register_buffer("pos", _sincos_2d(width, self.grid), persistent=False)
        self.cond = CondEmbedding(width, num_classes)
        self.blocks = nn.ModuleList([DiTBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(width, 2 * width)
        self.final = nn.Linear(width, patch_size * patch_size * in_channels)
        for lin in (self.final_ada, self.final):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def raw(self, x: Tensor, c_noise: Tensor, labels: Tensor) -> Tensor:
        b = x.shape[0]
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)  # [b, tokens, width]
        c = F.silu(self.cond(c_noise, labels))
        for blk in self.blocks:
            h = blk(h, c)
        sh, sc = self.final_ada(c).chunk(2, dim=1)
        h = self.final(_modulate(self.final_norm(h), sh, sc))  # [b, tokens, p*p*cin]
        g, p = self.grid, self.p
        h = h.reshape(b, g, g, p, p, self.cin).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, self.cin, g * p, g * p)


# ======================================================================================== classifier
class DigitsClassifier(nn.Module):
    """Small CNN digit classifier; ``features`` (penultimate layer, ``feature_dim``) feed the FD.

    GroupNorm only, so features of one image do not depend on the rest of the batch.
    """

    def __init__(self, img_resolution: int = 8, width: int = 32, feature_dim: int = 128,
                 num_classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()
        self.config = dict(img_resolution=img_resolution, width=width, feature_dim=feature_dim,
                           num_classes=num_classes, dropout=dropout)
        w = width

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(_groups(cout), cout), nn.SiLU()]

        self.body = nn.Sequential(*conv(1, w), *conv(w, w), nn.AvgPool2d(2),
                                  *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.AvgPool2d(2), nn.Flatten(),
                                  nn.Linear(2 * w * (img_resolution // 4) ** 2, feature_dim), nn.SiLU())
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``[B, feature_dim]``."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.features(x)))


# ================================================================================================ FD
def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[n, d]`` (the FID formula).

    ``|mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^{1/2})`` in float64, with the trace term computed
    as ``sum sqrt(eig(C_a^{1/2} C_b C_a^{1/2}))`` -- a symmetric PSD matrix, so no complex parts arise.
    """
    a = np.asarray(feats_a.detach().cpu() if isinstance(feats_a, Tensor) else feats_a, dtype=np.float64)
    b = np.asarray(feats_b.detach().cpu() if isinstance(feats_b, Tensor) else feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"feature sets must be [n >= 2, d] with equal d, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ev, vec = np.linalg.eigh(cov_a)
    sqrt_a = (vec * np.sqrt(np.clip(ev, 0, None))) @ vec.T
    mid = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((mid + mid.T) / 2), 0, None)).sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)
    return max(fd, 0.0)


@torch.no_grad()
def classifier_features(images: Tensor, classifier: DigitsClassifier | None = None,
                        batch_size: int = 1024) -> Tensor:
    """Classifier features of images in [-1, 1] (clamped; resized to the classifier's resolution)."""
    clf = load_classifier() if classifier is None else classifier
    res = clf.config["img_resolution"]
    x = images.detach().float().cpu().clamp(-1, 1)
    if x.shape[-1] != res:
        x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
    return torch.cat([clf.features(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


@functools.lru_cache(maxsize=8)
def _data_features(split: Split, weights_dir: str) -> Tensor:
    return classifier_features(load_digits_images(split)[0], load_classifier(weights_dir))


def fd_to_data(images: Tensor, split: Split = "all", weights_dir: str | Path | None = None) -> float:
    """FD between images ``[n, 1, H, W]`` in [-1, 1] (clamped) and a data split, in classifier features."""
    wd = str(WEIGHTS_DIR if weights_dir is None else weights_dir)
    return frechet_distance(classifier_features(images, load_classifier(wd)), _data_features(split, wd))


# =========================================================================================== loading
_BUILDERS: dict[str, type[nn.Module]] = {"unet": DigitsUNet, "dit": DigitsDiT, "classifier": DigitsClassifier}


def _weight_paths(name: str, weights_dir: str | Path | None, testbed: str = "digits") -> tuple[Path, Path]:
    d = Path(WEIGHTS_DIR if weights_dir is None else weights_dir)
    return d / f"{testbed}_{name}.safetensors", d / f"{testbed}_{name}.json"


def load_model(name: str, weights_dir: str | Path | None, testbed: str = "digits") -> nn.Module:
    """``{testbed}_{name}.safetensors`` and its ``.json`` (architecture, training record, checksum) from
    ``weights_dir`` (default: the shipped weights), checked before anything is built; eval mode, frozen."""
    wpath, mpath = _weight_paths(name, weights_dir, testbed)
    if not wpath.exists() or not mpath.exists():
        raise FileNotFoundError(f"{testbed} {name} weights not found at {wpath} (and {mpath.name}); "
                                f"run python -m indis.engine.studies.train_{testbed} train --which {name} "
                                "--out DIR")
    wpath, mpath = checkpoint_file(wpath, f"{testbed} {name} weights"), checkpoint_file(mpath, "metadata")
    try:
        meta = json.loads(mpath.read_text())
        arch = dict(meta["arch"])
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"{mpath} is not valid {testbed} model metadata ({type(e).__name__}: {e})") from e
    shapes, nbytes = stored_tensors(wpath)
    check_shapes(lambda: _BUILDERS[name](**arch), shapes, str(wpath), nbytes)
    tensors = load_file(str(wpath))
    if state_checksum(tensors, arch) != meta.get("checksum"):
        raise ValueError(f"{wpath} and {mpath.name} are corrupt or were edited: their tensors and `arch` "
                         f"do not match the checksum in {mpath.name}")
    model = _BUILDERS[name](**arch)
    model.load_state_dict(tensors, strict=True)
    model.eval().requires_grad_(False)
    model.metadata = meta  # type: ignore[assignment]
    return model


@functools.lru_cache(maxsize=8)
def _cached(name: str, weights_dir: str) -> nn.Module:
    return load_model(name, weights_dir)


def load_backbone(kind: BackboneKind = "unet", weights_dir: str | Path | None = None,
                  dtype: torch.dtype = torch.float32) -> EDMDenoiser:
    """A shipped digits denoiser (``unet`` or ``dit``): eval mode, ``requires_grad`` off, EMA weights.

    Call ``model(x, sigma[B], class_labels=None) -> x0``; ``.metadata`` holds the training record.
    """
    if kind not in ("unet", "dit"):
        raise ValueError(f"kind must be 'unet' or 'dit', got {kind!r}")
    model = load_model(kind, weights_dir)
    return model.to(dtype)  # type: ignore[return-value]


def load_classifier(weights_dir: str | Path | None = None) -> DigitsClassifier:
    """The shipped digits classifier (eval mode, frozen; cached -- do not modify it in place)."""
    return _cached("classifier", str(WEIGHTS_DIR if weights_dir is None else weights_dir))  # type: ignore[return-value]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ========================================================================================== training
def edm_loss(model: EDMDenoiser, images: Tensor, labels: Tensor | None, generator: torch.Generator,
             p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
    """EDM training loss (Karras et al. 2022): ln sigma ~ N(P_mean, P_std^2), weight (s^2+sd^2)/(s sd)^2."""
    b = images.shape[0]
    sigma = (torch.randn(b, generator=generator, dtype=images.dtype) * p_std + p_mean).exp()
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype) * sigma[:, None, None, None]
    sd = model.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    den = model(images + noise, sigma, labels)
    return (weight[:, None, None, None] * (den - images) ** 2).mean()


def adam_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam (AdamW when ``weight_decay``), the fused CPU kernel where this torch has one."""
    cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    try:
        return cls(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return cls(model.parameters(), lr=lr, weight_decay=weight_decay)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


DEFAULT_TRAIN: dict[str, dict[str, Any]] = {
    "unet": dict(steps=3600, batch_size=128, lr=2e-3, warmup=200, ema_decay=0.999, label_dropout=0.1,
                 grad_clip=1.0, seed=0),
    # DiT: label dropout 0.3 -- at 0.1 its unconditional samples were much worse (FD 22 vs 12 with 0.3),
    # the class-conditional ones unchanged; width 96 for longer beat width 128 in the same time.
    "dit": dict(steps=4200, batch_size=128, lr=2e-3, warmup=200, ema_decay=0.999, label_dropout=0.3,
                grad_clip=1.0, seed=0),
    "classifier": dict(steps=1200, batch_size=128, lr=2e-3, warmup=50, shift_pixels=1, noise_std=0.1,
                       weight_decay=1e-4, seed=0),
}


def edm_step(model: EDMDenoiser, ema: EDMDenoiser, opt: torch.optim.Optimizer, images: Tensor, labels: Tensor,
             gen: torch.Generator, step: int, cfg: dict[str, Any]) -> float:
    """One training step of :func:`train_backbone`'s recipe (shared by the Fashion-MNIST trainer): a fraction
    ``label_dropout`` of the labels to the null class, the step's learning rate (warm-up, cosine), the EDM
    loss, gradient clipping, Adam, then the EMA (decay ``min(ema_decay, (1 + step) / (10 + step))``).
    Returns the loss."""
    y = labels.clone()
    y[torch.rand(y.shape[0], generator=gen) < cfg["label_dropout"]] = -1  # -1 -> null class
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup"])
    loss = edm_loss(model, images, y, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    opt.step()
    beta = min(cfg["ema_decay"], (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1 - beta)
    return float(loss.detach())


def _eval_loss(model: EDMDenoiser, images: Tensor, labels: Tensor | None, seed: int = 1234,
               repeats: int = 4) -> float:
    """EDM loss averaged over ``repeats`` fixed-seed draws (comparable between checkpoints)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return float(torch.stack([edm_loss(model, images, labels, gen) for _ in range(repeats)]).mean())


def train_backbone(kind: BackboneKind, steps: int | None = None, arch: dict[str, Any] | None = None,
                   progress: bool = True, **overrides: Any) -> tuple[EDMDenoiser, dict[str, Any]]:
    """Train a digits denoiser with the EDM loss, Adam and an EMA of the weights; returns (EMA model, record).

    Seeded and deterministic for a given thread count. No flips or other augmentation (digits are not
    mirror-symmetric). A fraction ``label_dropout`` of the labels goes to the null class, so the same model
    is also unconditional.
    """
    from tqdm.auto import tqdm

    cfg = dict(DEFAULT_TRAIN[kind], **overrides)
    if steps is not None:
        cfg["steps"] = steps
    torch.manual_seed(cfg["seed"])
    model: EDMDenoiser = _BUILDERS[kind](**(arch or {}))  # type: ignore[assignment]
    ema: EDMDenoiser = _BUILDERS[kind](**model.config)  # type: ignore[assignment]
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    images, labels = load_digits_images("train")
    test_images, test_labels = load_digits_images("test")
    initial_loss = _eval_loss(model, test_images, None)
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    opt = adam_optimizer(model, cfg["lr"])
    n, bs = images.shape[0], cfg["batch_size"]
    perm, pos, losses = torch.randperm(n, generator=gen), 0, []
    t0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(cfg["steps"]), desc=f"train {kind}", disable=not progress, mininterval=1.0)
    model.train()
    for step in bar:
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + bs]
        pos += bs
        losses.append(edm_step(model, ema, opt, images[idx], labels[idx], gen, step, cfg))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    record = dict(kind=kind, model_class=type(model).__name__, arch=model.config, train=cfg,
                  steps=cfg["steps"], wall_time_s=round(wall, 2), cpu_time_s=round(cpu, 2),
                  final_loss=float(np.mean(losses[-200:])),
                  eval_loss_test_initial=initial_loss,
                  eval_loss_test_uncond=_eval_loss(ema, test_images, None),
                  eval_loss_test_cond=_eval_loss(ema, test_images, test_labels),
                  params=count_params(model), data=dict(source="sklearn.datasets.load_digits", split="train",
                                                        n_train=n, n_test=N_TEST, test="last 297 images"),
                  torch_version=torch.__version__, threads=torch.get_num_threads())
    return ema, record


def _shift_batch(x: Tensor, gen: torch.Generator, max_shift: int) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels (background -1 fills)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(b, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(b, h, w)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]


def classifier_step(model: nn.Module, opt: torch.optim.Optimizer, images: Tensor, labels: Tensor,
                    gen: torch.Generator, step: int, cfg: dict[str, Any]) -> float:
    """One step of :func:`train_classifier`'s recipe (shared by the Fashion-MNIST classifier): a batch of
    ``batch_size`` drawn with replacement, shifted by up to ``shift_pixels`` with light noise
    (``noise_std``), the step's learning rate, cross-entropy and AdamW. Returns the loss."""
    idx = torch.randint(0, images.shape[0], (cfg["batch_size"],), generator=gen)
    x = _shift_batch(images[idx], gen, cfg["shift_pixels"])
    x = x + cfg["noise_std"] * torch.randn(x.shape, generator=gen)
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup"])
    loss = F.cross_entropy(model(x), labels[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def train_classifier(steps: int | None = None, arch: dict[str, Any] | None = None, progress: bool = True,
                     **overrides: Any) -> tuple[DigitsClassifier, dict[str, Any]]:
    """Train the FD classifier (cross-entropy, AdamW, +-1 pixel shifts and light noise; no flips)."""
    from tqdm.auto import tqdm

    cfg = dict(DEFAULT_TRAIN["classifier"], **overrides)
    if steps is not None:
        cfg["steps"] = steps
    torch.manual_seed(cfg["seed"])
    model = DigitsClassifier(**(arch or {}))
    images, labels = load_digits_images("train")
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    opt = adam_optimizer(model, cfg["lr"], cfg["weight_decay"])
    n, losses = images.shape[0], []
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    for step in tqdm(range(cfg["steps"]), desc="train classifier", disable=not progress, mininterval=1.0):
        losses.append(classifier_step(model, opt, images, labels, gen, step, cfg))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.eval().requires_grad_(False)
    record = dict(kind="classifier", model_class="DigitsClassifier", arch=model.config, train=cfg,
                  steps=cfg["steps"], wall_time_s=round(wall, 2), cpu_time_s=round(cpu, 2),
                  final_loss=float(np.mean(losses[-100:])),
                  test_accuracy=classifier_accuracy(model), params=count_params(model),
                  data=dict(source="sklearn.datasets.load_digits", split="train", n_train=n, n_test=N_TEST,
                            test="last 297 images"),
                  torch_version=torch.__version__, threads=torch.get_num_threads())
    return model, record


@torch.no_grad()
def classifier_accuracy(classifier: DigitsClassifier | None = None, split: Split = "test") -> float:
    """Top-1 accuracy of the classifier on a data split."""
    clf = load_classifier() if classifier is None else classifier
    x, y = load_digits_images(split)
    return float((clf(x).argmax(1) == y).float().mean())


def save_model(name: str, model: nn.Module, record: dict[str, Any], out: str | Path,
               testbed: str = "digits") -> Path:
    """Write ``{testbed}_{name}.safetensors`` and ``{testbed}_{name}.json`` into the directory ``out``."""
    wpath, mpath = _weight_paths(name, out, testbed)
    wpath.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(wpath), {"format": "pt", "kind": name})
    record = {**record, "checksum": state_checksum(tensors, record["arch"])}
    mpath.write_text(json.dumps(record, indent=2) + "\n")
    _cached.cache_clear()
    _data_features.cache_clear()
    return wpath


# ============================================================================================ check
@torch.no_grad()
def sample_backbone(model: EDMDenoiser, n: int, steps: int = 30, solver: str = "heun", seed: int = 0,
                    class_labels: Tensor | None = None, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    batch_size: int = 500) -> Tensor:
    """``n`` samples: ``indis.sample`` on the EDM rho=7 grid from per-sample seeded noise times sigma_max."""
    from indis.engine.core.sampling import sample
    from indis.engine.core.schedules import get_sigmas

    sigmas = get_sigmas("edm", steps, sigma_min, sigma_max)
    res = model.config["img_resolution"]
    cin = model.config["in_channels"]
    outs = []
    for i in range(0, n, batch_size):
        seeds = range(seed * 1_000_003 + i, seed * 1_000_003 + min(n, i + batch_size))
        x = noise_from_seeds(seeds, (cin, res, res)) * sigma_max
        cond = None if class_labels is None else {"class_labels": class_labels[i:i + batch_size]}
        outs.append(sample(model, x, sigmas, solver, cond=cond))
    return torch.cat(outs)


def check(n: int = 1797, steps: int = 30, solvers: Sequence[str] = ("heun", "ipndm"),
          weights_dir: str | Path | None = None) -> dict[str, float]:
    """Print and return classifier accuracy and FD numbers for the shipped (or ``weights_dir``) weights.

    References: FD of the held-out test split (297) to the train split (1500) -- the floor a model that
    generalises (rather than memorises) can expect at that sample size -- and of clamped N(0, I) noise to all
    data (a ceiling). Per backbone and solver: FD of ``n`` unconditional samples to all data, of the first
    297 to the train split (comparable with the floor), of ``n`` class-conditional samples (labels
    ``i % 10``) to all data, and how often the classifier agrees with the requested label.
    """
    wd = str(WEIGHTS_DIR if weights_dir is None else weights_dir)
    clf = load_classifier(wd)
    res: dict[str, float] = {"classifier_test_accuracy": classifier_accuracy(clf)}
    res["fd_test_vs_train"] = frechet_distance(_data_features("test", wd), _data_features("train", wd))
    res["fd_noise_vs_all"] = fd_to_data(noise_from_seeds(range(n), (1, 8, 8)), "all", wd)
    print(f"classifier test accuracy {res['classifier_test_accuracy']:.4f}")
    print(f"FD test split (297) vs train split (1500): {res['fd_test_vs_train']:.3f}  (floor)")
    print(f"FD N(0, I) noise ({n}) vs all data: {res['fd_noise_vs_all']:.3f}  (ceiling)")
    labels = torch.arange(n) % 10
    for kind in ("unet", "dit"):
        model = load_backbone(kind, wd)  # type: ignore[arg-type]
        for solver in solvers:
            t0 = time.perf_counter()
            xs = sample_backbone(model, n, steps, solver)
            dt = time.perf_counter() - t0
            key = f"{kind}_{solver}"
            res[f"fd_{key}_uncond_vs_all"] = fd_to_data(xs, "all", wd)
            res[f"fd_{key}_uncond297_vs_train"] = fd_to_data(xs[:N_TEST], "train", wd)
            xc = sample_backbone(model, n, steps, solver, class_labels=labels)
            res[f"fd_{key}_cond_vs_all"] = fd_to_data(xc, "all", wd)
            agree = clf(xc.clamp(-1, 1)).argmax(1) == labels
            res[f"acc_{key}_cond"] = float(agree.float().mean())
            print(f"{kind:4s} {solver:5s} {steps} steps ({n} samples in {dt:.1f} s): FD to all data: "
                  f"uncond {res[f'fd_{key}_uncond_vs_all']:.3f}, "
                  f"class-cond {res[f'fd_{key}_cond_vs_all']:.3f}; "
                  f"297 uncond vs train {res[f'fd_{key}_uncond297_vs_train']:.3f}; "
                  f"classifier agrees with label {res[f'acc_{key}_cond']:.4f}", flush=True)
    return res
