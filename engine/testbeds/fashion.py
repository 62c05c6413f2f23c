"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017; MIT licence) as a testbed: 60,000 training and 10,000 test
greyscale images of 28x28 pixels in 10 clothing classes, read from the standard IDX files.

The files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte``, gzipped (``.gz``) or not, in one directory: ``data=`` where a function takes it
(the commands' ``--data DIR``), else the Debian package ``dataset-fashion-mnist``'s directory
(:data:`DEBIAN_DIR`). :func:`read_idx` reads any IDX file and refuses a malformed one before allocating what
its header declares.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import signal
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from indis.engine.testbeds.digits import (
    DigitsClassifier,
    DigitsUNet,
    EDMDenoiser,
    adam_optimizer,
    classifier_step,
    count_params,
    edm_step,
    load_model,
    save_model,
)

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
RESOLUTION = 28

# IDX type codes -> big-endian numpy dtypes
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MAX_IDX_BYTES = 64 << 20  # a header declaring more is refused before reading (the largest file: 47 MB)

Split = Literal["train", "test"]


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (two zero bytes, a type code, the number of dimensions, their sizes as big-endian int32,
    then the data in row-major order), gzipped or not, as a numpy array in native byte order.

    ``ValueError`` naming the file for a bad magic number, an unknown type, a truncated or overlong payload
    or a declared size above :data:`MAX_IDX_BYTES`; only the declared number of bytes (and one more, to
    detect trailing data) is ever decompressed."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_TYPES or head[3] == 0:
                raise ValueError(f"{path} is not an IDX file (header {head!r})")
            ndim = head[3]
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise ValueError(f"{path}: truncated header ({ndim} dimensions declared)")
            dims = struct.unpack(f">{ndim}i", dims_raw)
            dtype = np.dtype(_IDX_TYPES[head[2]])
            count = 1
            for d in dims:
                if d < 0:
                    raise ValueError(f"{path}: negative dimension in {dims}")
                count *= d
            nbytes = count * dtype.itemsize
            if nbytes > MAX_IDX_BYTES:
                raise ValueError(f"{path}: declares {dims} ({nbytes} bytes), above the {MAX_IDX_BYTES}-byte "
                                 "limit")
            data = f.read(nbytes + 1)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path} cannot be read as an IDX file ({type(e).__name__}: {e})") from e
    if len(data) != nbytes:
        what = "truncated" if len(data) < nbytes else "longer than its header declares"
        raise ValueError(f"{path}: payload {what} ({len(data)} bytes read, {nbytes} declared for {dims})")
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def data_dir(data: str | Path | None = None) -> Path:
    """The directory holding the four IDX files: ``data``, else :data:`DEBIAN_DIR`; ``FileNotFoundError``
    naming the package and the files when they are not there."""
    d = Path(data) if data is not None else DEBIAN_DIR
    missing = [name for pair in FILES.values() for name in pair if _find(d, name) is None]
    if missing:
        where = f"--data {d}" if data is not None else f"the default {d}"
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {where}: missing {', '.join(missing)} (or .gz). Install the Debian "
            f"package ({'apt-get install ' + DEBIAN_PACKAGE}; the README's commands do it where apt-get is "
            "available) or pass --data DIR with the four standard IDX files.")
    return d


def _find(d: Path, name: str) -> Path | None:
    for candidate in (d / name, d / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def available(data: str | Path | None = None) -> bool:
    """Whether the four files are where :func:`data_dir` looks."""
    try:
        data_dir(data)
    except FileNotFoundError:
        return False
    return True


def load_fashion(split: Split = "train", data: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` (0..9, :data:`CLASSES`) of a split."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = data_dir(data)
    img_name, lab_name = FILES[split]
    images, labels = read_idx(_find(d, img_name)), read_idx(_find(d, lab_name))
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (RESOLUTION, RESOLUTION):
        raise ValueError(f"{img_name}: expected uint8 images [N, 28, 28], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{lab_name}: expected {images.shape[0]} labels, got shape {labels.shape}")
    if labels.dtype != np.uint8:
        raise ValueError(f"{lab_name}: expected uint8 labels, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and labels.max() >= len(CLASSES):
        raise ValueError(f"{lab_name}: labels outside 0..{len(CLASSES) - 1}")
    return images, labels


def load_fashion_images(split: Split = "train", data: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """A split as the models see it: images ``float32 [N, 1, 28, 28]`` in [-1, 1] and labels ``int64 [N]``."""
    images, labels = load_fashion(split, data)
    x = torch.from_numpy(images.astype(np.float32)).div_(127.5).sub_(1.0)[:, None]
    return x, torch.from_numpy(labels)


# ============================================================================================ models
# The digits testbed's EDM-preconditioned UNet (Karras et al. 2022) at 28x28 -> 14x14 -> 7x7,
# class-conditional with a null class (label dropout), and its GroupNorm CNN classifier for FD features and
# accuracy.
UNET_ARCH: dict[str, Any] = dict(img_resolution=RESOLUTION, in_channels=1, channels=[32, 64, 128],
                                 num_blocks=1, attn_levels=[2], emb_dim=128, heads=4, num_classes=10,
                                 dropout=0.0, sigma_data=0.5)
CLASSIFIER_ARCH: dict[str, Any] = dict(img_resolution=RESOLUTION, width=32, feature_dim=128, num_classes=10,
                                       dropout=0.2)
TRAIN: dict[str, dict[str, Any]] = {
    "unet": dict(steps=7000, batch_size=64, lr=1e-3, warmup=500, ema_decay=0.9995, label_dropout=0.1,
                 grad_clip=1.0, seed=0, checkpoint_every=250),
    "classifier": dict(steps=2000, batch_size=128, lr=2e-3, warmup=100, shift_pixels=2, noise_std=0.05,
                       weight_decay=1e-4, seed=0),
}


def load_backbone(weights_dir: str | Path | None = None, dtype: torch.dtype = torch.float32) -> EDMDenoiser:
    """The shipped Fashion-MNIST UNet (``fashion_unet.safetensors``; EMA weights, eval mode, frozen):
    ``model(x [B, 1, 28, 28], sigma [B], class_labels=None) -> x0``; ``.metadata`` holds its training
    record."""
    return load_model("unet", weights_dir, "fashion").to(dtype)  # type: ignore[return-value]


def load_classifier(weights_dir: str | Path | None = None) -> DigitsClassifier:
    """The shipped Fashion-MNIST classifier (``fashion_classifier.safetensors``; eval mode, frozen)."""
    return load_model("classifier", weights_dir, "fashion")  # type: ignore[return-value]


# ========================================================================================== training
def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _resume_key(cfg: dict, labels: Tensor) -> dict:
    """What a checkpoint must share to be resumed: the settings (but how often it is written), the
    architecture, and the training data's size and labels."""
    return {"cfg": {k: v for k, v in cfg.items() if k != "checkpoint_every"}, "arch": UNET_ARCH,
            "n_train": int(labels.shape[0]),
            "labels_sha256": hashlib.sha256(labels.numpy().tobytes()).hexdigest()}


def train_unet(out: str | Path, steps: int | None = None, data: str | Path | None = None,
               progress: bool = True, log_every: int = 100, **overrides: Any) -> tuple[EDMDenoiser, dict]:
    """Train the Fashion-MNIST UNet with the EDM loss, Adam and an EMA of the weights; resumable.

    Every ``checkpoint_every`` steps the whole state -- weights, EMA, optimiser, random generator, data
    order, step -- goes to ``out/fashion_unet.ckpt`` (written atomically), and so does an interruption
    (SIGINT / SIGTERM: the step under way finishes first, then ``KeyboardInterrupt``); another exception
    leaves the last checkpoint. A new call with the same configuration resumes there and ends where an
    uninterrupted run ends (the same thread count gives the same weights). A checkpoint of another
    configuration is refused. At the end the EMA
    weights are written as ``out/fashion_unet.safetensors`` + ``.json``. Returns (EMA model, record).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(TRAIN["unet"], **overrides)
    if steps is not None:
        cfg["steps"] = steps
    ckpt_path = out / "fashion_unet.ckpt"
    images, labels = load_fashion_images("train", data)
    torch.manual_seed(cfg["seed"])
    model, ema = DigitsUNet(**UNET_ARCH), DigitsUNet(**UNET_ARCH)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    opt = adam_optimizer(model, cfg["lr"])
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    n, bs = images.shape[0], cfg["batch_size"]
    state = {"step": 0, "perm": torch.randperm(n, generator=gen), "pos": 0, "losses": [], "seconds": 0.0}
    key = _resume_key(cfg, labels)
    if ckpt_path.exists():
        try:
            ckpt = torch.load(ckpt_path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same problem for the user
            raise ValueError(f"{ckpt_path} is not a readable checkpoint ({type(e).__name__}: {e}); remove it "
                             "to start over") from e
        if not isinstance(ckpt, dict) or ckpt.get("key") != key:
            raise ValueError(f"{ckpt_path} was written by another configuration or other data; remove it or "
                             "pass the same settings to resume")
        if ckpt.get("threads") != torch.get_num_threads():
            print(f"warning: {ckpt_path} was written with {ckpt.get('threads')} threads, this run has "
                  f"{torch.get_num_threads()}: the weights will differ slightly from an uninterrupted run",
                  flush=True)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        state = ckpt["state"]
        print(f"resuming {ckpt_path} at step {state['step']} of {cfg['steps']}", flush=True)

    def checkpoint() -> None:
        _save_atomic({"key": key, "threads": torch.get_num_threads(), "model": model.state_dict(),
                      "ema": ema.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                      "state": state}, ckpt_path)

    stop: list[int] = []  # the signal that asked to stop at the next step boundary (a second one: at once)

    def on_signal(signum: int, frame: object) -> None:
        if stop:
            raise KeyboardInterrupt(f"signal {signum} again: stopped without a checkpoint of this step")
        stop.append(signum)

    handlers = {}
    t0 = time.perf_counter()
    seconds0 = state["seconds"]
    model.train()
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, on_signal)
        bar = tqdm(range(state["step"], cfg["steps"]), desc="train fashion unet", disable=not progress,
                   mininterval=5.0, initial=state["step"], total=cfg["steps"])
        for step in bar:
            if state["pos"] + bs > n:
                state["perm"], state["pos"] = torch.randperm(n, generator=gen), 0
            idx = state["perm"][state["pos"]:state["pos"] + bs]
            state["pos"] += bs
            state["losses"].append(edm_step(model, ema, opt, images[idx], labels[idx], gen, step, cfg))
            state["step"] = step + 1
            state["seconds"] = seconds0 + time.perf_counter() - t0
            if state["step"] % log_every == 0:
                recent = float(np.mean(state["losses"][-log_every:]))
                bar.set_postfix(loss=f"{recent:.4f}")
                if not progress:
                    print(f"step {state['step']}/{cfg['steps']} loss {recent:.4f} "
                          f"({state['seconds']:.0f} s)", flush=True)
            if state["step"] % cfg["checkpoint_every"] == 0 or state["step"] == cfg["steps"] or stop:
                checkpoint()
            if stop:
                raise KeyboardInterrupt(f"stopped by signal {stop[0]} after step {state['step']}; the same "
                                        f"command resumes from {ckpt_path}")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    record = dict(kind="unet", model_class="DigitsUNet", arch=UNET_ARCH, train=cfg, steps=cfg["steps"],
                  wall_time_s=round(state["seconds"], 1), final_loss=float(np.mean(state["losses"][-500:])),
                  params=count_params(ema), data=dict(source=f"Fashion-MNIST ({DEBIAN_PACKAGE})",
                                                       split="train", n_train=n),
                  torch_version=torch.__version__, threads=torch.get_num_threads())
    save_model("unet", ema, record, out, "fashion")
    return ema, record


def train_classifier(out: str | Path, steps: int | None = None, data: str | Path | None = None,
                     progress: bool = True, **overrides: Any) -> tuple[DigitsClassifier, dict]:
    """Train the FD / accuracy classifier (cross-entropy, AdamW, small shifts and noise); writes
    ``out/fashion_classifier.safetensors`` + ``.json``. Returns (model, record with its test accuracy)."""
    from tqdm.auto import tqdm

    cfg = dict(TRAIN["classifier"], **overrides)
    if steps is not None:
        cfg["steps"] = steps
    torch.manual_seed(cfg["seed"])
    model = DigitsClassifier(**CLASSIFIER_ARCH)
    images, labels = load_fashion_images("train", data)
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    opt = adam_optimizer(model, cfg["lr"], cfg["weight_decay"])
    n, losses = images.shape[0], []
    t0 = time.perf_counter()
    model.train()
    for step in tqdm(range(cfg["steps"]), desc="train fashion classifier", disable=not progress,
                     mininterval=5.0):
        losses.append(classifier_step(model, opt, images, labels, gen, step, cfg))
    model.eval().requires_grad_(False)
    test_x, test_y = load_fashion_images("test", data)
    record = dict(kind="classifier", model_class="DigitsClassifier", arch=CLASSIFIER_ARCH, train=cfg,
                  steps=cfg["steps"], wall_time_s=round(time.perf_counter() - t0, 1),
                  final_loss=float(np.mean(losses[-100:])), test_accuracy=accuracy(model, test_x, test_y),
                  params=count_params(model), data=dict(source=f"Fashion-MNIST ({DEBIAN_PACKAGE})",
                                                        split="train", n_train=n),
                  torch_version=torch.__version__, threads=torch.get_num_threads())
    save_model("classifier", model, record, out, "fashion")
    return model, record


@torch.no_grad()
def accuracy(classifier: DigitsClassifier, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``classifier`` on images in [-1, 1] (clamped)."""
    right = sum(int((classifier(images[i:i + batch_size].clamp(-1, 1)).argmax(1) == labels[i:i + batch_size])
                    .sum()) for i in range(0, images.shape[0], batch_size))
    return right / max(images.shape[0], 1)


# ============================================================================================= check
def check(weights_dir: str | Path | None = None, data: str | Path | None = None, n: int = 1000,
          steps: int = 50, solver: str = "ipndm") -> dict[str, float]:
    """Print and return the shipped (or ``weights_dir``) models' quality: the classifier's test accuracy;
    the FD (classifier features) between the two halves of the test set, and between its first ``n`` images
    and the rest (the floor at ``n`` samples); ``n`` class-conditional samples (labels ``i % 10``, ``steps``
    steps of ``solver`` on the EDM grid): their FD to the same rest of the test set and how often the
    classifier agrees with the requested label."""
    from indis.engine.testbeds.digits import classifier_features, frechet_distance, sample_backbone

    clf, model = load_classifier(weights_dir), load_backbone(weights_dir)
    test_x, test_y = load_fashion_images("test", data)
    if not 2 <= n <= test_x.shape[0] - 2:
        raise ValueError(f"n={n}: the samples are compared with the test images after the first n, so n must "
                         f"lie in [2, {test_x.shape[0] - 2}]")
    feats = classifier_features(test_x, clf)
    half = feats.shape[0] // 2
    res = {"classifier_test_accuracy": accuracy(clf, test_x, test_y),
           "fd_test_half_vs_half": frechet_distance(feats[:half], feats[half:]),
           f"fd_test_{n}_vs_rest": frechet_distance(feats[:n], feats[n:])}
    print(f"classifier test accuracy {res['classifier_test_accuracy']:.4f}")
    print(f"FD test half vs half ({half} each): {res['fd_test_half_vs_half']:.3f}; first {n} test images vs "
          f"the rest: {res[f'fd_test_{n}_vs_rest']:.3f} (the floor at {n} samples)", flush=True)
    labels = torch.arange(n) % 10
    t0 = time.perf_counter()
    xs = sample_backbone(model, n, steps, solver, class_labels=labels, batch_size=250)
    res[f"fd_samples_{n}_vs_test"] = frechet_distance(classifier_features(xs, clf), feats[n:])
    res["samples_accuracy"] = accuracy(clf, xs, labels)
    print(f"{n} class-conditional samples, {solver} {steps} steps ({time.perf_counter() - t0:.0f} s): FD to "
          f"the test images after the first {n}: {res[f'fd_samples_{n}_vs_test']:.3f}; the classifier agrees "
          f"with the label {res['samples_accuracy']:.4f}", flush=True)
    return res
