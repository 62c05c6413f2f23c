"""Exported models behind indis' interfaces, and the fallback chain TensorRT -> onnxruntime -> torch.

:class:`ExportedDenoiser` is a k-diffusion denoiser (``model(x, sigma[B], **cond) -> x0``), so it drops into
``indis.sample`` and ``GraphSampler``; :class:`ExportedPredictor` returns an INDIS
:class:`~indis.engine.core.schedules.Schedule`. Both wrap a *runner* --
:class:`~indis.export.ort_backend.OrtModel` or :class:`~indis.export.tensorrt_backend.TrtModel` -- that
maps named torch inputs to output tensors.

:func:`load_denoiser` / :func:`load_predictor` try the backends in order and log why each one that was
skipped could not be used; the returned :class:`Choice` says which backend (and which onnxruntime provider)
runs and every reason on the way. A failure never silently changes the result: each backend either runs the
exported model as built or is skipped with its reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from indis.engine.core.conditions import flatten
from indis.engine.core.families import Denoiser, NoiseFamily, get_family
from indis.engine.core.predictor import check_format
from indis.engine.core.schedules import Schedule

log = logging.getLogger("indis.export")
BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")


class ExportedDenoiser:
    """An exported denoiser as a k-diffusion model (inputs cast to the file's types, result in x's dtype)."""

    def __init__(self, runner) -> None:
        if "x" not in runner.inputs or "sigma" not in runner.inputs:
            raise ValueError(f"inputs {sorted(runner.inputs)}: an exported denoiser takes x and sigma[B]")
        if runner.metadata.get("kind") not in (None, "denoiser"):
            raise ValueError(f"this file is an exported {runner.metadata['kind']}, not a denoiser")
        self.runner = runner

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        feeds = {"x": x, "sigma": sigma}
        given = flatten({k: v for k, v in cond.items() if v is not None}, "cond", leaves=(Tensor, int))
        for k, v in given.items():
            v = torch.as_tensor(v, device=x.device)
            if v.is_floating_point():  # an embedding: [B, ...], or [1, ...] shared by the batch
                feeds[k] = v.expand(x.shape[0], *v.shape[1:]) if v.ndim and v.shape[0] == 1 else v
            else:                       # class labels: [B], or one for all
                feeds[k] = v.reshape(-1).expand(x.shape[0])
        return self.runner.run(feeds)[0].to(x.dtype)

    def in_family(self, family: NoiseFamily | str, prediction: str = "x0") -> Denoiser:
        """This exported denoiser as a :class:`Denoiser` in ``family``'s coordinate (sigma input): a drop-in
        for the torch model it was exported from (e.g. ``indis.from_diffusers``'s, whose states are VP
        latents), so ``indis.sample`` takes the same x. ``prediction``: what it returns, ``"x0"`` or
        ``"eps"`` (the noise, converted from x0 -- give the source model's, ``den.prediction``, where
        guidance rescale acts on the prediction). A flow model's t = 1 start (alpha 0) cannot be converted:
        start at a finite sigma."""
        fam = get_family(family)
        if prediction not in ("x0", "eps"):
            raise ValueError(f"prediction={prediction!r}: choose 'x0' or 'eps'")

        def net(x_fam: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
            view = (-1,) + (1,) * (x_fam.ndim - 1)
            s64 = sigma.to(torch.float64)
            alpha = fam.alpha(s64).to(x_fam.dtype).view(view)
            x0 = self(x_fam / alpha, sigma, **cond)
            if prediction == "x0":
                return x0
            return (x_fam - alpha * x0) / fam.s(s64).to(x_fam.dtype).view(view)

        return Denoiser(net, fam, prediction, "sigma")


class ExportedPredictor:
    """An exported INDIS predictor: ``phi(x_T, cond=None) -> Schedule`` (float64 tensors on x_T's device)."""

    def __init__(self, runner) -> None:
        if runner.metadata and runner.metadata.get("kind") != "predictor":
            raise ValueError(f"not an exported INDIS predictor (kind={runner.metadata.get('kind')!r})")
        if runner.metadata:
            check_format(runner.metadata.get("format", "indis-predictor/1"), "this exported predictor")
        self.runner = runner

    def __call__(self, x_T: Tensor, cond: Tensor | None = None) -> Schedule:
        feeds = {"x_T": x_T}
        for name, what in (("class_labels", "class labels [B]"), ("cond", "its condition embedding [B, D]")):
            if name in self.runner.inputs:
                if cond is None:
                    raise ValueError(f"this predictor is conditional: pass {what}")
                feeds[name] = cond
        grid, shift, scale = (t.to(torch.float64) for t in self.runner.run(feeds))
        return Schedule(grid, shift, scale)


@dataclass
class Choice:
    """Which backend runs, on which provider, and why the ones before it were skipped."""

    backend: str
    provider: str
    reasons: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        skipped = "".join(f"\n  skipped: {r}" for r in self.reasons)
        return f"{self.backend} ({self.provider}){skipped}"


def _order(backend: str, device: torch.device) -> list[str]:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {BACKENDS}")
    if backend != "auto":
        return [backend]
    return ["tensorrt", "onnxruntime", "torch"] if device.type == "cuda" else ["onnxruntime", "torch"]


def _runner(name: str, onnx_path: Path | None, engine_dir: Path | None, device: torch.device,
            precision: str, providers: list[str] | None, build_opts: dict):
    """One backend's runner, or an exception saying why it cannot run."""
    if name == "tensorrt":
        from .tensorrt_backend import TrtModel, build_engine, tensorrt_version

        if device.type != "cuda":
            raise RuntimeError("TensorRT needs a CUDA device")
        if tensorrt_version() is None:
            raise RuntimeError("the tensorrt package is not installed (or is a stub that cannot import)")
        if onnx_path is None or engine_dir is None:
            raise RuntimeError("no ONNX file / engine directory given")
        plan = build_engine(onnx_path, engine_dir, precision=precision, **build_opts)
        return TrtModel(plan, device=device)
    if name == "onnxruntime":
        from .ort_backend import OrtModel

        if onnx_path is None:
            raise RuntimeError("no ONNX file given")
        return OrtModel(onnx_path, providers)
    raise AssertionError(name)


def _load(wrap: Callable, torch_model: Callable | None, *, onnx_path: str | Path | None,
          engine_dir: str | Path | None, backend: str, device: torch.device | str, precision: str,
          providers: list[str] | None, build_opts: dict | None) -> tuple[Callable, Choice]:
    device = torch.device(device)
    reasons: list[str] = []
    onnx = Path(onnx_path) if onnx_path is not None else None
    engines = Path(engine_dir) if engine_dir is not None else None
    for name in _order(backend, device):
        if name == "torch":
            if torch_model is None:
                reasons.append("torch: no torch model given")
                break
            return torch_model, Choice("torch", str(device), reasons)
        try:
            runner = _runner(name, onnx, engines, device, precision, providers, build_opts or {})
        except Exception as e:  # noqa: BLE001 - every failure is a logged reason to try the next backend
            reasons.append(f"{name}: {type(e).__name__}: {e}")
            log.warning("backend %s unavailable (%s: %s)", name, type(e).__name__, e)
            if backend != "auto":
                raise
            continue
        choice = Choice(name, runner.provider, reasons)
        if getattr(runner, "fallback", None):
            choice.reasons.append(f"onnxruntime provider: {runner.fallback}")
        log.info("running %s", choice)
        return wrap(runner), choice
    raise RuntimeError("no backend could run the model:\n  " + "\n  ".join(reasons))


def load_denoiser(torch_model: Callable | None = None, *, onnx_path: str | Path | None = None,
                  engine_dir: str | Path | None = None, backend: str = "auto",
                  device: torch.device | str = "cpu", precision: str = "fp32",
                  providers: list[str] | None = None,
                  build_opts: dict | None = None) -> tuple[Callable, Choice]:
    """The first backend that can run the denoiser: TensorRT (CUDA), onnxruntime, then ``torch_model``."""
    return _load(ExportedDenoiser, torch_model, onnx_path=onnx_path, engine_dir=engine_dir, backend=backend,
                 device=device, precision=precision, providers=providers, build_opts=build_opts)


def load_predictor(torch_model: Callable | None = None, *, onnx_path: str | Path | None = None,
                   engine_dir: str | Path | None = None, backend: str = "auto",
                   device: torch.device | str = "cpu", precision: str = "fp32",
                   providers: list[str] | None = None,
                   build_opts: dict | None = None) -> tuple[Callable, Choice]:
    """Like :func:`load_denoiser` for an INDIS predictor (the torch fallback is the Predictor itself)."""
    return _load(ExportedPredictor, torch_model, onnx_path=onnx_path, engine_dir=engine_dir, backend=backend,
                 device=device, precision=precision, providers=providers, build_opts=build_opts)
