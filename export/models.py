"""Per-model export descriptions: one place for input/output names, dynamic axes, profiles and sample inputs.

Shaped after the TensorRT demo's model protocol (``get_input_names``, ``get_dynamic_axes``,
``get_input_profile``, ``get_sample_input``), with one difference that matters for INDIS: a denoiser's
noise-level input ``sigma`` is ``[B]`` and follows the batch axis in every profile (the demo exports the SD
UNet timestep as ``[1]``, which forces one noise level on the whole batch -- no per-sample schedules).

* :func:`denoiser_spec` -- any module with the k-diffusion convention ``model(x, sigma[B], **cond) -> x0``
  (the project's digits UNet and DiT, and a diffusers ``UNet2DConditionModel`` or SD3/DiT-style transformer
  through ``indis.from_diffusers``, whose network then gets ``timestep [B]`` inside the graph): inputs
  ``x [B, *shape]``, ``sigma [B]`` and condition inputs -- integer ``[B]`` (e.g. ``class_labels``) or float
  tensors with a batch axis (e.g. ``encoder_hidden_states [B, L, D]``, nested ones by dotted path) --,
  output ``denoised [B, *shape]``.
* :func:`predictor_spec` -- an INDIS :class:`~indis.engine.core.predictor.Predictor`: input ``x_T`` (and
  ``class_labels`` for a class-conditional head, or ``cond [B, cond_dim]`` for one conditioned on an
  embedding), outputs ``grid [B, N+1]``, ``shift [B, N]``, ``scale [B, N]``, decoded in float32 (TensorRT
  has no float64).

Dynamic axes: the batch axis ``"batch"`` everywhere, plus named axes such as a text's sequence length
(``axes={"seq": (min, opt, max)}``, used in a condition's shape as ``("seq", 768)``), which the TensorRT
profile covers too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from indis.engine.core.conditions import unflatten
from indis.engine.core.families import Denoiser
from indis.engine.core.predictor import FORMAT, Predictor

BATCH = "batch"
Axis = tuple[int, int, int]  # a dynamic axis' (min, opt, max) size


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, shape with ``"batch"`` for the batch axis (and other names for other
    dynamic axes), dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: torch.dtype

    def concrete(self, batch: int, sizes: dict[str, int] | None = None) -> tuple[int, ...]:
        """The shape at ``batch`` and the named axes' ``sizes``."""
        sizes = sizes or {}
        return tuple(batch if d == BATCH else sizes[d] if isinstance(d, str) else int(d) for d in self.shape)


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
    axes: dict[str, Axis] = field(default_factory=dict)  # dynamic axes besides the batch: (min, opt, max)

    def __post_init__(self) -> None:
        if not 1 <= self.batch_min <= self.batch_opt <= self.batch_max:
            raise ValueError(f"need 1 <= batch_min <= batch_opt <= batch_max, got {self.batch_min}, "
                             f"{self.batch_opt}, {self.batch_max}")
        for a, size in self.axes.items():
            if a == BATCH or len(size) != 3 or not 1 <= size[0] <= size[1] <= size[2]:
                raise ValueError(f"axis {a!r}: need a name other than 'batch' and 1 <= min <= opt <= max, "
                                 f"got {size}")
        named = {d for t in (*self.inputs, *self.outputs) for d in t.shape if isinstance(d, str)}
        if named - {BATCH} - set(self.axes):
            raise ValueError(f"axes {sorted(named - {BATCH} - set(self.axes))} are used in shapes but have "
                             f"no (min, opt, max) in axes")

    def sizes(self, which: int) -> dict[str, int]:
        """Every named axis at its min (0), opt (1) or max (2) size."""
        return {a: size[which] for a, size in self.axes.items()}

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Legacy exporter form: the batch axis and every named axis of each input and output."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in (*self.inputs,
                                                                                              *self.outputs)}

    def dynamic_shapes(self) -> tuple:
        """Dynamo exporter form, shaped like ``module.forward``'s arguments: the ``fixed`` leading inputs,
        then a tuple for the ``*cond`` varargs (one shared ``torch.export.Dim`` per named axis)."""
        dims = {BATCH: torch.export.Dim(BATCH, min=1, max=max(self.batch_max, 2))}
        dims.update({a: torch.export.Dim(a, min=lo, max=max(hi, lo + 1))
                     for a, (lo, _, hi) in self.axes.items()})
        per = [{i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs]
        varargs = per[self.fixed:]
        return (*per[:self.fixed], tuple(varargs)) if varargs else tuple(per)

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimisation profile: (min, opt, max) shape per input, over the batch and named axes."""
        batches = (self.batch_min, self.batch_opt, self.batch_max)
        return {t.name: tuple(t.concrete(b, self.sizes(k)) for k, b in enumerate(batches))
                for t in self.inputs}

    def sample_inputs(self, batch: int = 2, device: torch.device | str = "cpu", seed: int = 0,
                      sizes: dict[str, int] | None = None) -> tuple[Tensor, ...]:
        """Valid random inputs: noise-scaled x, distinct per-sample sigmas (log-uniform in the model's sigma
        range where the metadata has one, else 0.02 .. 55), labels in range; named axes at ``sizes``
        (default: their opt sizes)."""
        g = torch.Generator().manual_seed(seed)
        sizes = self.sizes(1) if sizes is None else sizes
        lo, hi = (math.log(float(self.metadata.get(k, d))) for k, d in (("sigma_min", 0.0183),
                                                                         ("sigma_max", 54.6)))
        out = []
        for t in self.inputs:
            shape = t.concrete(batch, sizes)
            if t.name == "sigma":
                v = torch.exp(torch.empty(shape).uniform_(lo, hi, generator=g))
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
        return self.model(x, sigma, **unflatten(dict(zip(self.cond_names, cond, strict=True))))


def check_per_sample_sigma(model: nn.Module, shape: Sequence[int], cond: dict[str, Tensor] | None = None,
                           dtype: torch.dtype = torch.float32) -> None:
    """See below; ``cond``: condition inputs of batch 2 by dotted path."""
    _check_per_sample_sigma(model, shape, cond or {}, dtype)


def _check_per_sample_sigma(model: nn.Module, shape: Sequence[int], cond: dict[str, Tensor],
                            dtype: torch.dtype) -> None:
    """Refuse a model that does not take one noise level per sample: its row i must not depend on the other
    rows' sigma. Raises ``ValueError`` with what went wrong."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *shape, generator=g).expand(2, *shape).to(dtype)
    sigma = torch.tensor([0.3, 7.0], dtype=dtype)
    try:
        with torch.no_grad():
            both = model(x, sigma, **unflatten(cond))
            alone = [model(x[i:i + 1], sigma[i:i + 1], **unflatten({k: v[i:i + 1] for k, v in cond.items()}))
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
                  cond: dict[str, int | tuple[int | str, ...]] | None = None,
                  axes: dict[str, Axis] | None = None,
                  batch_min: int = 1, batch_opt: int = 8, batch_max: int = 64, input_std: float = 1.0,
                  sigma_range: tuple[float, float] | None = None, check: bool = True) -> ExportSpec:
    """Export description of a k-diffusion-convention denoiser.

    ``cond``: condition inputs by dotted path: an int is a class input with that many values (``[B]``
    int64, e.g. ``{"class_labels": 10}``); a shape is a float32 input ``[B, *shape]`` whose named dims are
    dynamic axes given in ``axes`` (e.g. ``{"encoder_hidden_states": ("seq", 768)}`` with
    ``axes={"seq": (1, 77, 77)}``). ``sigma_range``: where the sample inputs' sigmas lie (default: the
    family's range of a :class:`Denoiser` where it is finite). ``check`` runs :func:`check_per_sample_sigma`
    first.
    """
    cond, axes = dict(cond or {}), dict(axes or {})
    model = model.eval()
    cond_specs = tuple(TensorSpec(k, (BATCH,), torch.int64) if isinstance(n, int) and not isinstance(n, bool)
                       else TensorSpec(k, (BATCH, *n), torch.float32) for k, n in cond.items())
    x = TensorSpec("x", (BATCH, *shape), torch.float32)
    inputs = (x, TensorSpec("sigma", (BATCH,), torch.float32), *cond_specs)
    meta = {"kind": "denoiser", "shape": ",".join(map(str, shape)), "input_std": str(input_std)}
    classes = {k: n for k, n in cond.items() if isinstance(n, int)}
    if classes:
        meta["num_classes"] = str(min(classes.values()))
        meta["cond"] = ",".join(f"{k}:{n}" for k, n in classes.items())
    if sigma_range is None and isinstance(model, Denoiser) and all(map(math.isfinite,
                                                                       model.family.sigma_range)):
        sigma_range = model.family.sigma_range
    if sigma_range is not None:
        meta["sigma_min"], meta["sigma_max"] = (repr(float(v)) for v in sorted(sigma_range))
    spec = ExportSpec(name, _Denoiser(model, list(cond)), inputs, (TensorSpec("denoised", x.shape, x.dtype),),
                      batch_min, batch_opt, batch_max, meta, fixed=2, axes=axes)
    if check:
        g = torch.Generator().manual_seed(0)
        sample = {t.name: (torch.tensor([0, cond[t.name] - 1]) if not t.dtype.is_floating_point
                           else torch.randn(t.concrete(2, spec.sizes(1)), generator=g)) for t in cond_specs}
        check_per_sample_sigma(model, shape, sample)
    return spec


class _Predictor(nn.Module):
    """``forward(x_T[, class_labels | cond])`` -> (grid, shift, scale), all float32."""

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
        inputs.append(TensorSpec("cond", (BATCH, c.cond_dim), torch.float32))
        meta["cond_dim"] = str(c.cond_dim)
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
