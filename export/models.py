"""Per-model export descriptions: one place for input/output names, dynamic axes, profiles and sample inputs.

Shaped after the TensorRT demo's model protocol (``get_input_names``, ``get_dynamic_axes``,
``get_input_profile``, ``get_sample_input``), with one difference that matters for INDIS: a denoiser's
noise-level input ``sigma`` is ``[B]`` and follows the batch axis in every profile (the demo exports the SD
UNet timestep as ``[1]``, which forces one noise level on the whole batch -- no per-sample schedules).

* :func:`denoiser_spec` -- any module with the k-diffusion convention ``model(x, sigma[B], **cond) -> x0``
  (the project's digits UNet and DiT included): inputs ``x [B, *shape]``, ``sigma [B]`` and optional integer
  condition inputs ``[B]`` (e.g. ``class_labels``), output ``denoised [B, *shape]``.
* :func:`predictor_spec` -- an INDIS :class:`~indis.engine.core.predictor.Predictor`: input ``x_T`` (and
  ``class_labels`` for a class-conditional head), outputs ``grid [B, N+1]``, ``shift [B, N]``,
  ``scale [B, N]``, decoded in float32 (TensorRT has no float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from indis.engine.core.predictor import FORMAT, Predictor

BATCH = "batch"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, shape with ``"batch"`` for the dynamic axis, dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: torch.dtype

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)


@dataclass(frozen=True)
class ExportSpec:
    """Everything needed to export, check, build and run one model."""

    name: str
    module: nn.Module                  # the exported forward: positional inputs in ``inputs`` order
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_min: int = 1
    batch_opt: int = 8
    batch_max: int = 64
    metadata: dict[str, str] = field(default_factory=dict)
    fixed: int = 1                     # leading named inputs of ``module.forward``; the rest are ``*cond``

    def __post_init__(self) -> None:
        if not 1 <= self.batch_min <= self.batch_opt <= self.batch_max:
            raise ValueError(f"need 1 <= batch_min <= batch_opt <= batch_max, got {self.batch_min}, "
                             f"{self.batch_opt}, {self.batch_max}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Legacy exporter form: every input and output has the batch axis 0 dynamic."""
        return {t.name: {i: BATCH for i, d in enumerate(t.shape) if d == BATCH} for t in (*self.inputs,
                                                                                          *self.outputs)}

    def dynamic_shapes(self) -> tuple:
        """Dynamo exporter form, shaped like ``module.forward``'s arguments: the ``fixed`` leading inputs,
        then a tuple for the ``*cond`` varargs (one shared ``torch.export.Dim`` for the batch)."""
        dim = torch.export.Dim(BATCH, min=1, max=max(self.batch_max, 2))
        per = [{i: dim for i, d in enumerate(t.shape) if d == BATCH} for t in self.inputs]
        varargs = per[self.fixed:]
        return (*per[:self.fixed], tuple(varargs)) if varargs else tuple(per)

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimisation profile: (min, opt, max) shape per input."""
        return {t.name: (t.concrete(self.batch_min), t.concrete(self.batch_opt), t.concrete(self.batch_max))
                for t in self.inputs}

    def sample_inputs(self, batch: int = 2, device: torch.device | str = "cpu",
                      seed: int = 0) -> tuple[Tensor, ...]:
        """Valid random inputs: noise-scaled x, distinct per-sample sigmas, labels in range."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for t in self.inputs:
            shape = t.concrete(batch)
            if t.name == "sigma":
                v = torch.exp(torch.empty(shape).uniform_(-4, 4, generator=g))     # 0.02 .. 55
            elif not t.dtype.is_floating_point:
                v = torch.randint(0, int(self.metadata.get("num_classes", "1")), shape, generator=g)
            else:
                v = torch.randn(shape, generator=g) * float(self.metadata.get("input_std", "1"))
            out.append(v.to(device=device, dtype=t.dtype))
        return tuple(out)



class _Denoiser(nn.Module):
    """``forward(x, sigma, *cond)`` -> ``model(x, sigma, **dict(zip(cond_names, cond)))``."""

    def __init__(self, model: nn.Module, cond_names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.cond_names = model, tuple(cond_names)

    def forward(self, x: Tensor, sigma: Tensor, *cond: Tensor) -> Tensor:
        return self.model(x, sigma, **dict(zip(self.cond_names, cond, strict=True)))


def check_per_sample_sigma(model: nn.Module, shape: Sequence[int], cond: dict[str, Tensor] | None = None,
                           dtype: torch.dtype = torch.float32) -> None:
    """Refuse a model that does not take one noise level per sample: its row i must not depend on the other
    rows' sigma. Raises ``ValueError`` with what went wrong."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *shape, generator=g).expand(2, *shape).to(dtype)
    sigma = torch.tensor([0.3, 7.0], dtype=dtype)
    cond = cond or {}
    try:
        with torch.no_grad():
            both = model(x, sigma, **cond)
            alone = [model(x[i:i + 1], sigma[i:i + 1], **{k: v[i:i + 1] for k, v in cond.items()})
                     for i in range(2)]
    except (TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"{type(model).__name__} does not take a per-sample sigma: calling "
                         f"model(x [2, ...], sigma [2]) failed ({type(e).__name__}: {e}). Exported "
                         "denoisers must follow model(x, sigma[B], **cond) -> x0") from e
    if not isinstance(both, Tensor) or both.shape != x.shape:
        raise ValueError(f"{type(model).__name__} returned {type(both).__name__} "
                         f"{getattr(both, 'shape', '')}, expected a tensor shaped like x {tuple(x.shape)}")
    for i in range(2):
        if not torch.allclose(both[i:i + 1], alone[i], rtol=1e-4, atol=1e-5):
            raise ValueError(f"{type(model).__name__} does not take a per-sample sigma: sample {i} of a "
                             "batch differs from the same sample run alone with its own sigma (is sigma "
                             "broadcast from its first element?)")
    if torch.allclose(alone[0], alone[1]):
        raise ValueError(f"{type(model).__name__} ignores sigma (same output at sigma 0.3 and 7.0)")


def denoiser_spec(model: nn.Module, shape: Sequence[int], *, name: str = "denoiser",
                  cond: dict[str, int] | None = None, batch_min: int = 1, batch_opt: int = 8,
                  batch_max: int = 64, input_std: float = 1.0, check: bool = True) -> ExportSpec:
    """Export description of a k-diffusion-convention denoiser.

    ``cond``: integer condition inputs and their number of values (e.g. ``{"class_labels": 10}``), each
    ``[B]`` int64. ``check`` runs :func:`check_per_sample_sigma` first.
    """
    cond = dict(cond or {})
    model = model.eval()
    if check:
        labels = {k: torch.tensor([0, n - 1]) for k, n in cond.items()}
        check_per_sample_sigma(model, shape, labels)
    x = TensorSpec("x", (BATCH, *shape), torch.float32)
    inputs = (x, TensorSpec("sigma", (BATCH,), torch.float32),
              *(TensorSpec(k, (BATCH,), torch.int64) for k in cond))
    meta = {"kind": "denoiser", "shape": ",".join(map(str, shape)), "input_std": str(input_std)}
    if cond:
        meta["num_classes"] = str(min(cond.values()))
        meta["cond"] = ",".join(f"{k}:{n}" for k, n in cond.items())
    return ExportSpec(name, _Denoiser(model, list(cond)), inputs, (TensorSpec("denoised", x.shape, x.dtype),),
                      batch_min, batch_opt, batch_max, meta, fixed=2)


class _Predictor(nn.Module):
    """``forward(x_T[, class_labels])`` -> (grid, shift, scale), all float32."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, x_T: Tensor, *cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        head = self.predictor
        res = head.residual(x_T, cond[0] if cond else None, None)
        base = head.base.to(torch.float32)
        raw = base.expand(x_T.shape[0], -1) if res is None else base + res.to(torch.float32)
        s = head.config.schedule.decode(raw, dtype=torch.float32)
        return s.grid, s.shift, s.scale


def predictor_spec(predictor: Predictor, *, name: str = "predictor", batch_min: int = 1, batch_opt: int = 8,
                   batch_max: int = 64) -> ExportSpec:
    """Export description of an INDIS predictor (see the module docstring)."""
    c = predictor.config
    n = c.schedule.nfe
    inputs = [TensorSpec("x_T", (BATCH, *c.shape), torch.float32)]
    meta = {"kind": "predictor", "format": FORMAT, "nfe": str(n), "solver": c.solver, "backbone": c.backbone,
            "final_zero": str(c.schedule.final_zero), "input_std": str(c.schedule.sigma_max)}
    if c.num_classes:
        inputs.append(TensorSpec("class_labels", (BATCH,), torch.int64))
        meta["num_classes"] = str(c.num_classes)
    if c.cond_dim:
        raise ValueError("predictors with a continuous condition embedding (cond_dim) cannot be exported yet")
    outputs = (TensorSpec("grid", (BATCH, n + 1), torch.float32),
               TensorSpec("shift", (BATCH, n), torch.float32), TensorSpec("scale", (BATCH, n), torch.float32))
    return ExportSpec(name, _Predictor(predictor.eval()), tuple(inputs), outputs, batch_min, batch_opt,
                      batch_max, meta, fixed=1)


def check_feeds(model: str, names: Sequence[str], feeds: dict[str, Tensor], batch_range: tuple[int, int],
                built_for: str) -> int:
    """Refuse inputs a runner was not built for (names, batch range); returns the batch size."""
    if set(feeds) != set(names):
        raise ValueError(f"{model} takes inputs {sorted(names)}, got {sorted(feeds)}")
    batch = next(iter(feeds.values())).shape[0]
    lo, hi = batch_range
    if not lo <= batch <= hi:
        raise ValueError(f"batch {batch} is outside the range [{lo}, {hi}] {model} {built_for}; redo it with "
                         "--batch-min/--batch-max")
    return batch
