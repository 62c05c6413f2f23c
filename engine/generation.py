"""Seeds -> samples for the project's backbones: ``indis generate`` and ``indis fd``.

A sample is a seed: its noise is ``noise_from_seeds`` (bit-exact in any process) and, for a
class-conditional backbone, its label is ``labels_from_seeds`` (or one class for all, or none).
:func:`generate` samples the seeds in fixed chunks of ``batch_size`` consecutive seeds, so every chunk is
computed alike however the work is split: under ``torchrun`` (``WORLD_SIZE`` > 1; gloo on CPU, nccl on
CUDA) rank r takes chunks r, r + world, ..., rank 0 gathers them in seed order, and the result equals one
process's bit for bit (the same thread count per process). Schedules: a heuristic (``edm``, ``logsnr``,
...), ``gits`` (dynamic programming on the calibration seeds :data:`GITS_SEEDS`), a saved grid (``.json``
with ``grid`` and optionally ``shift`` / ``scale``: LD3-global, GITS) or an INDIS head (``.safetensors``,
called on each chunk's x_T and labels). Output: ``samples.npz`` (samples, seeds, labels, the settings as
JSON) and ``grid.png``.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from indis.engine.core.predictor import Predictor
from indis.engine.core.sampling import sample
from indis.engine.core.schedules import HEURISTICS, Schedule, get_sigmas
from indis.engine.tuning.teacher import labels_from_seeds, noise_from_seeds

GITS_SEEDS = range(1 << 40, (1 << 40) + 64)  # --schedule gits calibrates on these, far from user seeds
MAX_SEEDS = 10_000_000  # one --seeds list at most
MAX_ARRAY_BYTES = 4 << 30  # an array of a samples file declaring more is refused before it is read


@dataclass(frozen=True)
class Backbone:
    """A shipped denoiser: how to load it, its sample shape, classes (0: unconditional) and noise range."""

    load: Callable[[str | None], nn.Module]
    shape: tuple[int, ...]
    num_classes: int
    dataset: str  # its feature_space(): the classifier and held-out images FD is measured with
    sigma_min: float = 0.002
    sigma_max: float = 80.0


def _digits(kind: str) -> Callable[[str | None], nn.Module]:
    def load(weights: str | None) -> nn.Module:
        from indis.engine.testbeds.digits import load_backbone

        return load_backbone(kind, weights)  # type: ignore[arg-type]
    return load


def _fashion(weights: str | None) -> nn.Module:
    from indis.engine.testbeds.fashion import load_backbone

    return load_backbone(weights)


BACKBONES: dict[str, Backbone] = {
    "fashion-unet": Backbone(_fashion, (1, 28, 28), 10, "fashion"),
    "digits-unet": Backbone(_digits("unet"), (1, 8, 8), 10, "digits"),
    "digits-dit": Backbone(_digits("dit"), (1, 8, 8), 10, "digits"),
}


@dataclass(frozen=True)
class FeatureSpace:
    """Where a dataset's samples are judged: its classifier (FD features, label agreement) and the features
    of its held-out reference images."""

    classifier: nn.Module
    reference: Tensor
    description: str

    def features(self, images: Tensor) -> Tensor:
        from indis.engine.testbeds.digits import classifier_features

        return classifier_features(images, self.classifier)

    def fd_to_data(self, images: Tensor) -> float:
        """FD between ``images`` (in [-1, 1], clamped) and the reference images, in classifier features."""
        from indis.engine.testbeds.digits import frechet_distance

        return frechet_distance(self.features(images), self.reference)


def feature_space(dataset: str, weights: str | Path | None = None, data: str | Path | None = None
                  ) -> FeatureSpace:
    """``dataset``'s :class:`FeatureSpace` (shipped classifier unless ``weights``): Fashion-MNIST's test set
    (10,000; ``data``: its IDX folder) or all 1,797 sklearn digits. Cached per (dataset, resolved folders):
    the classifier and the reference features are shared, not to be changed in place."""
    return _feature_space(dataset, *(None if d is None else str(Path(d).resolve()) for d in (weights, data)))


@functools.lru_cache(maxsize=4)
def _feature_space(dataset: str, weights: str | None, data: str | None) -> FeatureSpace:
    from indis.engine.testbeds.digits import classifier_features

    if dataset == "fashion":
        from indis.engine.testbeds.fashion import load_classifier, load_fashion_images

        clf = load_classifier(weights)
        reference, description = load_fashion_images("test", data)[0], "Fashion-MNIST test set (10,000)"
    elif dataset == "digits":
        from indis.engine.testbeds.digits import load_classifier, load_digits_images

        clf = load_classifier(weights)
        reference, description = load_digits_images("all")[0], "all 1,797 digits"
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose fashion or digits")
    return FeatureSpace(clf, classifier_features(reference, clf), description)


def parse_seeds(spec: str) -> list[int]:
    """``"0-63"``, ``"5"``, ``"0-9,100-109"`` -> the seeds in order (each once); ``ValueError`` otherwise."""
    seeds: list[int] = []
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ValueError(f"--seeds {spec!r}: use ranges such as 0-63 or lists such as 0-9,100") from None
        if a < 0 or b < a or b >= 1 << 63:
            raise ValueError(f"--seeds {spec!r}: {part!r} must be a range low-high, 0 <= low <= high < 2**63")
        if len(seeds) + b - a + 1 > MAX_SEEDS:
            raise ValueError(f"--seeds {spec!r} names more than {MAX_SEEDS:,} seeds")
        seeds += range(a, b + 1)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {spec!r} names a seed twice")
    return seeds


def seed_labels(seeds: Sequence[int], backbone: Backbone, labels: str) -> Tensor | None:
    """Each seed's class label: ``"seeds"`` (``labels_from_seeds``), ``"none"`` (unconditional) or one
    class ``"K"`` for all."""
    if labels == "none" or backbone.num_classes == 0:
        return None
    if labels == "seeds":
        return labels_from_seeds(seeds, backbone.num_classes)
    try:
        k = int(labels)
    except ValueError:
        raise ValueError(f"--labels {labels!r}: use seeds, none or a class 0..{backbone.num_classes - 1}"
                         ) from None
    if not 0 <= k < backbone.num_classes:
        raise ValueError(f"--labels {k}: the backbone has classes 0..{backbone.num_classes - 1}")
    return torch.full((len(seeds),), k, dtype=torch.long)


ScheduleFn = Callable[[Tensor, Tensor | None], Tensor | Schedule]


def resolve_schedule(spec: str, model: nn.Module, backbone: Backbone, nfe: int, solver: str,
                     labels: str = "seeds", name: str = "") -> ScheduleFn:
    """``spec`` as a function of a chunk's (x_T, labels): a heuristic name, ``gits``, a ``.json`` grid or an
    INDIS head ``.safetensors`` (checked against ``nfe``, ``solver`` and the backbone ``name``)."""
    lo, hi = backbone.sigma_min, backbone.sigma_max
    device = next((q.device for q in model.parameters()), torch.device("cpu"))  # a parameterless model: CPU
    if spec in HEURISTICS:
        grid = get_sigmas(spec, nfe, lo, hi)
        return lambda x, c: grid
    if spec == "gits":
        from indis.engine.tuning.fit import fit_gits

        seeds = list(GITS_SEEDS)
        x = noise_from_seeds(seeds, backbone.shape, device=device) * hi
        c = seed_labels(seeds, backbone, labels)
        grid = fit_gits(model, x, nfe=nfe, sigma_min=lo, sigma_max=hi,
                        labels=None if c is None else c.to(device))
        return lambda x, c: grid
    path = Path(spec)
    if path.suffix == ".json":
        try:
            d = json.loads(path.read_text())
            grid = torch.tensor(d["grid"], dtype=torch.float64)
            shift, scale = (None if d.get(k) is None else torch.tensor(d[k], dtype=torch.float64)
                            for k in ("shift", "scale"))
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
            raise ValueError(f"--schedule {path}: not a grid file ({type(e).__name__}: {e})") from e
        if grid.shape != (nfe + 1,) or any(v is not None and v.shape != (nfe,) for v in (shift, scale)):
            raise ValueError(f"--schedule {path} holds {grid.numel() - 1} steps (or a shift / scale of "
                             f"another length); --nfe is {nfe}")
        for field, want in (("backbone", name), ("solver", solver)):  # where the file says what it is for
            if d.get(field) not in (None, want) and want:
                raise ValueError(f"--schedule {path} was tuned for {field} {d[field]!r}, not {want!r}")
        schedule = Schedule(grid, shift, scale)
        return lambda x, c: schedule
    if path.suffix == ".safetensors":
        phi = Predictor.load(path, nfe=nfe, solver=solver, backbone=name or None, map_location=device).eval()
        return lambda x, c: phi(x, c)
    raise ValueError(f"--schedule {spec!r}: use a heuristic {HEURISTICS}, gits, a .json grid or an INDIS "
                     "head .safetensors")


def world() -> tuple[int, int]:
    """(rank, world size) of a ``torchrun`` launch, (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@torch.no_grad()
def generate(model: nn.Module, backbone: Backbone, seeds: Sequence[int], labels: Tensor | None,
             fn: ScheduleFn, solver: str, batch_size: int = 64, device: torch.device | str = "cpu",
             progress: bool = True) -> Tensor | None:
    """Samples ``[N, *shape]`` (float32, CPU) of ``seeds`` in chunks of ``batch_size``; under ``torchrun``
    this rank's chunks, gathered on rank 0 (which returns them all; other ranks return None)."""
    from tqdm.auto import tqdm

    rank, size = world()
    chunks = [(a, min(a + batch_size, len(seeds))) for a in range(0, len(seeds), batch_size)]
    mine = chunks[rank::size]
    device = torch.device(device)
    out: dict[int, Tensor] = {}
    for a, b in tqdm(mine, desc=f"generate (rank {rank})" if size > 1 else "generate", unit="chunk",
                     disable=not progress or rank != 0):
        x = (noise_from_seeds(seeds[a:b], backbone.shape) * backbone.sigma_max).to(device)
        c = None if labels is None else labels[a:b].to(device)
        schedule = fn(x, c)
        if isinstance(schedule, Tensor):
            schedule = schedule.to(device)
        else:
            schedule = Schedule(*(None if v is None else v.to(device)
                                  for v in (schedule.grid, schedule.shift, schedule.scale)))
        cond = None if c is None else {"class_labels": c}
        out[a] = sample(model, x, schedule, solver, cond=cond).float().cpu()
    if size > 1:
        import torch.distributed as dist

        gathered: list[dict[int, Tensor]] | None = [{} for _ in range(size)] if rank == 0 else None
        dist.gather_object(out, gathered, dst=0)
        if rank != 0:
            return None
        out = {k: v for part in gathered for k, v in part.items()}  # type: ignore[union-attr]
    return torch.cat([out[a] for a, _ in chunks]) if chunks else torch.empty(0, *backbone.shape)


def image_grid(samples: Tensor, columns: int | None = None) -> np.ndarray:
    """Samples ``[N, 1, H, W]`` in [-1, 1] (clamped) tiled row by row with a 1-pixel gap: uint8 ``[R, C]``."""
    n, _, h, w = samples.shape
    cols = columns or max(1, int(np.ceil(np.sqrt(n))))
    rows = max(1, -(-n // cols))
    img = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1), 255, dtype=np.uint8)
    pixels = ((samples[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        img[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = pixels[i]
    return img


def write_png(path: str | Path, image: np.ndarray) -> None:
    """An 8-bit greyscale PNG (the format's IHDR, one IDAT, IEND; no filtering)."""
    h, w = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + image[r].astype(np.uint8).tobytes() for r in range(h))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)


def save(out: str | Path, samples: Tensor, seeds: Sequence[int], labels: Tensor | None, settings: dict,
         grid_images: int = 64) -> tuple[Path, Path]:
    """``out/samples.npz`` (``samples`` float32, ``seeds``, ``labels`` with -1 for none, ``settings`` JSON)
    and ``out/grid.png`` (the first ``grid_images`` samples)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    npz, png = out / "samples.npz", out / "grid.png"
    lab = np.full(len(seeds), -1, dtype=np.int64) if labels is None else labels.numpy().astype(np.int64)
    tmp = out / ".samples.tmp.npz"
    np.savez_compressed(tmp, samples=samples.numpy().astype(np.float32), seeds=np.asarray(seeds, np.int64),
                        labels=lab, settings=np.array(json.dumps(settings)))
    os.replace(tmp, npz)
    write_png(png, image_grid(samples[:grid_images]))
    return npz, png


def _check_header(z: object, member: str) -> None:
    """``ValueError`` unless the ``.npy`` ``member`` of the zip ``z`` declares a plain array of at most
    :data:`MAX_ARRAY_BYTES` (read from its header alone)."""
    fmt = np.lib.format
    with z.open(member) as m:  # type: ignore[attr-defined]
        major, _ = fmt.read_magic(m)
        shape, _, dtype = (fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0)(m)
    if dtype.hasobject or float(np.prod(shape, dtype=np.float64)) * dtype.itemsize > MAX_ARRAY_BYTES:
        raise ValueError(f"{member} declares {shape} {dtype}")


def load_samples(path: str | Path) -> tuple[Tensor, np.ndarray, np.ndarray, dict]:
    """What :func:`save` wrote: samples, seeds, labels, settings; ``ValueError`` for anything else."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:  # sizes first: a small file must not declare huge arrays
            for member in ("samples.npy", "seeds.npy", "labels.npy", "settings.npy"):
                _check_header(z, member)
        with np.load(path, allow_pickle=False) as f:
            samples, seeds, labels = f["samples"], f["seeds"], f["labels"]
            settings = json.loads(str(f["settings"]))
    except (KeyError, ValueError, OSError, TypeError, zipfile.BadZipFile, RecursionError) as e:
        raise ValueError(f"{path} is not a samples file of indis generate ({type(e).__name__}: {e})") from e
    if not isinstance(settings, dict) or samples.dtype != np.float32 or seeds.dtype != np.int64 or \
            labels.dtype != np.int64:
        raise ValueError(f"{path}: settings, samples, seeds or labels of the wrong kind")
    if samples.ndim != 4 or samples.shape[0] != seeds.shape[0] or labels.shape != seeds.shape:
        raise ValueError(f"{path}: samples {samples.shape}, seeds {seeds.shape}, labels {labels.shape} "
                         "disagree")
    return torch.from_numpy(samples.astype(np.float32)), seeds, labels, settings


def fd_report(path: str | Path, teacher: str | Path | None = None, data: str | Path | None = None,
              weights: str | Path | None = None) -> dict[str, float]:
    """FD (the backbone's classifier features) of a samples file to its dataset's held-out images (Fashion-
    MNIST's test set; all 1,797 digits) and, given ``teacher`` (another samples file of the same seeds), to
    the teacher's samples; also the classifier's agreement with the samples' labels where they have them."""
    from indis.engine.testbeds.digits import frechet_distance
    from indis.engine.testbeds.fashion import accuracy  # any classifier's top-1 agreement

    samples, seeds, labels, settings = load_samples(path)
    name = settings.get("backbone", "")
    if name not in BACKBONES:
        raise ValueError(f"{path}: unknown backbone {name!r} in its settings")
    if tuple(samples.shape[1:]) != BACKBONES[name].shape:
        raise ValueError(f"{path}: samples of shape {tuple(samples.shape[1:])}, {name} makes "
                         f"{BACKBONES[name].shape}")
    space = feature_space(BACKBONES[name].dataset, weights, data)
    feats = space.features(samples)
    out = {"n": float(samples.shape[0]), "fd_data": frechet_distance(feats, space.reference)}
    print(f"{path}: {samples.shape[0]} samples of {name}; FD to the {space.description}: "
          f"{out['fd_data']:.3f}")
    if (labels >= 0).all() and samples.shape[0]:
        out["accuracy"] = accuracy(space.classifier, samples, torch.from_numpy(labels))
        print(f"classifier agrees with the labels: {out['accuracy']:.4f}")
    if teacher is not None:
        t_samples, t_seeds, t_labels, t_settings = load_samples(teacher)
        mine, theirs = np.argsort(seeds), np.argsort(t_seeds)
        if (t_settings.get("backbone") != name or not np.array_equal(seeds[mine], t_seeds[theirs])
                or not np.array_equal(labels[mine], t_labels[theirs])):
            raise ValueError(f"--teacher {teacher} holds other seeds, other labels or another backbone than "
                             f"{path}")
        out["fd_teacher"] = frechet_distance(feats, space.features(t_samples))
        print(f"FD to the teacher ({teacher}): {out['fd_teacher']:.3f}")
    return out
