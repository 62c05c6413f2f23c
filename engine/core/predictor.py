"""The INDIS schedule predictor phi(x_T, c) and its schedule heads (Yuan et al., CVPR 2026, arXiv 2603.17671).

Every head maps its input to one raw vector per sample, ``[logits (N+1) | o_shift (N) | o_scale (N)]``, which
:meth:`ScheduleConfig.decode` turns into a :class:`Schedule`:

* grid: softmax -> cumsum -> min-max -> map into ``space`` (``schedules.grid_from_logits``): strictly
  descending, endpoints exactly ``sigma_max`` / ``sigma_min`` for any logits (a trailing 0 with
  ``final_zero``);
* time shift ``dtau_n = b_shift * tanh(o/2)`` in log-sigma units (the network sees ``sigma_n * exp(dtau_n)``);
* output scale ``gamma_n = 1 + b_scale * tanh(o/2)`` on that call's noise prediction (the corrected call
  ``eps_hat_n = gamma_n * eps_theta(x_n, tau_n + dtau_n)``, defined in ``indis.engine.core.solvers``).

Each head's raw vector is ``base + residual``: ``base`` (float64) starts at the raw vector of the ``init``
heuristic grid with zero shift/scale outputs, and the residual layer starts at weight 0, so at initialisation
every head returns that heuristic exactly, Δτ = 0, γ = 1. ``base`` is the head's *blind* part (one global
schedule); the instance-aware part is a residual on top, so phi can start from a tuned blind solution.

Heads: :class:`Predictor` (phi: reads the normalised, optionally pooled, noise and an optional condition),
``Predictor(blind=True)`` (phi's blind ablation: same output capacity, no x_T input) and
:class:`PerInstanceSchedule` (the per-instance oracle of the paper's synthetic study: free parameters per
training sample). Checkpoints are safetensors with the configuration as JSON metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from indis.engine.core.checkpoints import check_shapes, checkpoint_file, state_checksum, stored_tensors
from indis.engine.core.families import get_family
from indis.engine.core.profiling import nvtx_range
from indis.engine.core.schedules import Schedule, Space, get_sigmas, grid_from_logits, logits_from_grid
from indis.engine.core.solvers import SOLVERS

FORMAT = "indis-predictor/3"
#: Formats this version refuses, with the reason a user reads.
RETIRED_FORMATS = {
    "indis-predictor/2": "its checksum covered only its tensors, so an edited configuration (solver, NFE, "
                         "sigma range, input scale) could not be detected; re-tune it (indis fit) or "
                         "re-export it with this version",
    "indis-predictor/1": "it was tuned when the output scale gamma multiplied the denoised x0; gamma now "
                         "scales the noise prediction, eps_hat = gamma * eps_theta(x_n, tau_n + dtau_n) (the "
                         "paper's definition), so its shift and scale would act differently -- re-tune it "
                         "(indis fit)",
}
HEURISTICS = ("edm", "logsnr", "uniform_t", "time_quadratic")


@dataclass(frozen=True)
class ScheduleConfig:
    """What a schedule head produces: N steps between fixed endpoints, the mapping space, bounds and init.

    ``space``: the axis the normalised grid positions are laid out on -- ``lambda`` (log sigma; the default,
    natural for VE/EDM and VP, whose heuristics are near-uniform there), ``t`` (the family's time; use it for
    flow matching, whose t = 1 start is sigma = inf) or ``sigma``. ``final_zero`` appends sigma = 0 after
    ``sigma_min`` (the grid keeps N steps). ``shift_bound`` / ``scale_bound`` are b_Δ / b_γ; 0 disables.
    """

    nfe: int
    sigma_min: float
    sigma_max: float
    family: str = "ve"
    space: Space = "lambda"
    init: str = "edm"
    rho: float = 7.0
    final_zero: bool = False
    shift_bound: float = 0.1
    scale_bound: float = 0.05

    def __post_init__(self) -> None:
        if self.nfe < 1 + self.final_zero:
            raise ValueError(f"nfe={self.nfe} is too small (needs >= {1 + self.final_zero})")
        if self.init not in HEURISTICS:
            raise ValueError(f"init={self.init!r} is unknown; choose one of {HEURISTICS}")
        if self.space not in ("lambda", "t", "sigma"):
            raise ValueError(f"space={self.space!r} is unknown; choose lambda, t or sigma")
        if not 0 < self.sigma_min < self.sigma_max < math.inf:
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {self.sigma_min}, {self.sigma_max}")
        if not 0 < self.rho < math.inf:
            raise ValueError(f"rho={self.rho} must be positive and finite")
        if not 0 <= self.shift_bound < math.inf or not 0 <= self.scale_bound < 1:
            raise ValueError("need shift_bound >= 0 and 0 <= scale_bound < 1 (the scale must stay positive)")
        get_family(self.family)

    @property
    def num_logits(self) -> int:
        return self.nfe + (0 if self.final_zero else 1)

    @property
    def width(self) -> int:
        """Length of the raw output vector: logits, shift outputs, scale outputs."""
        return self.num_logits + 2 * self.nfe

    def init_grid(self) -> Tensor:
        """The heuristic grid the heads reproduce at initialisation, ``[N+1]`` float64."""
        return get_sigmas(self.init, self.nfe, self.sigma_min, self.sigma_max, rho=self.rho,
                          family=self.family, final_zero=self.final_zero)

    def init_raw(self) -> Tensor:
        """Raw vector that decodes to the init grid with Δτ = 0 and γ = 1, ``[width]`` float64."""
        return self.raw_from_grid(self.init_grid())

    def raw_from_grid(self, grid: Tensor) -> Tensor:
        """Raw vector that decodes to ``grid`` ``[N+1]`` (e.g. a GITS or LD3 grid) with Δτ = 0, γ = 1."""
        grid = torch.as_tensor(grid, dtype=torch.float64)
        if grid.shape != (self.nfe + 1,):
            raise ValueError(f"grid must have shape [{self.nfe + 1}], got {tuple(grid.shape)}")
        if self.final_zero:
            grid = grid[:-1]
        logits = logits_from_grid(grid, self.space, self.family)
        return torch.cat([logits, logits.new_zeros(2 * self.nfe)])

    def decode(self, raw: Tensor, dtype: torch.dtype = torch.float64) -> Schedule:
        """``[B, width]`` raw outputs -> per-sample :class:`Schedule` (float64 by default, differentiable;
        the ONNX export decodes in float32, which TensorRT requires)."""
        raw = raw.to(dtype)
        n, p = self.nfe, self.num_logits
        grid = grid_from_logits(raw[:, :p], self.sigma_min, self.sigma_max, self.space, self.family)
        if self.final_zero:
            grid = torch.cat([grid, grid.new_zeros(grid.shape[0], 1)], dim=-1)
        shift = self.shift_bound * torch.tanh(raw[:, p:p + n] / 2)
        scale = 1 + self.scale_bound * torch.tanh(raw[:, p + n:] / 2)
        return Schedule(grid, shift, scale)


@dataclass(frozen=True)
class PredictorConfig:
    """Everything that defines a predictor and must match at load time (stored as checkpoint metadata).

    ``shape``: one sample's shape. ``pool``: average-pool image-shaped noise ``[C, H, W]`` to
    ``pool x pool`` before the MLP (rescaled to unit variance); None reads the whole noise. ``input_scale``
    maps x_T to unit-variance noise (``1 / family.s(sigma_max)``, the state's noise scale).
    ``num_classes`` > 0: class labels enter as ``class_scale`` * one-hot -> linear; ``cond_dim`` > 0: a
    generic embedding vector enters through a linear layer. ``blind``: ignore x_T (the paper's ablation).
    """

    schedule: ScheduleConfig
    solver: str
    shape: tuple[int, ...]
    backbone: str = ""
    hidden: int = 128
    depth: int = 2
    pool: int | None = None
    blind: bool = False
    num_classes: int = 0
    class_scale: float = 1.0
    cond_dim: int = 0
    input_scale: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver={self.solver!r} is unknown; choose one of {SOLVERS}")
        if self.pool is not None and (len(self.shape) != 3 or self.pool < 1):
            raise ValueError(f"pool needs image-shaped samples [C, H, W] and pool >= 1, got {self.shape}")
        if self.depth < 1 or self.hidden < 1 or self.num_classes < 0 or self.cond_dim < 0:
            raise ValueError("depth and hidden must be >= 1, num_classes and cond_dim >= 0")
        if not self.shape or min(self.shape) < 1:
            raise ValueError(f"shape must be one sample's non-empty shape, got {self.shape}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.input_scale is None:
            fam = get_family(self.schedule.family)
            s_max = fam.s(torch.tensor(self.schedule.sigma_max, dtype=torch.float64))
            object.__setattr__(self, "input_scale", float(1 / s_max))
        if not (0 < self.input_scale < math.inf and math.isfinite(self.class_scale)):
            raise ValueError(f"input_scale={self.input_scale} must be positive and finite, class_scale "
                             f"({self.class_scale}) finite")

    @property
    def num_features(self) -> int:
        if self.blind:
            return 0
        if self.pool is None:
            return math.prod(self.shape)
        return self.shape[0] * self.pool * self.pool

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PredictorConfig:
        d = dict(d)
        d["schedule"] = ScheduleConfig(**d["schedule"])
        d["shape"] = tuple(d["shape"])
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"predictor metadata has unknown fields {sorted(unknown)}")
        return cls(**d)


class _Head(nn.Module):
    """Shared structure: ``raw = base + residual``; ``base`` (float64) is the blind schedule."""

    config: PredictorConfig

    def _init_base(self, base: Tensor | None) -> None:
        init = self.config.schedule.init_raw() if base is None else base.detach().to(torch.float64).clone()
        self.base = nn.Parameter(init)

    def residual(self, x_T: Tensor, cond: Tensor | None, index: Tensor | None) -> Tensor | None:
        raise NotImplementedError

    def raw(self, x_T: Tensor, cond: Tensor | None = None, index: Tensor | None = None) -> Tensor:
        """The raw ``[B, width]`` vector (float64) before decoding."""
        res = self.residual(x_T, cond, index)
        if res is None:
            return self.base.expand(x_T.shape[0], -1)
        return self.base + res.to(torch.float64)

    def forward(self, x_T: Tensor, cond: Tensor | None = None, index: Tensor | None = None) -> Schedule:
        """Per-sample schedule for initial states ``x_T`` ``[B, *shape]`` (and condition ``cond``)."""
        with nvtx_range("predictor"):
            return self.config.schedule.decode(self.raw(x_T, cond, index))


class Predictor(_Head):
    """phi(x_T, c): normalise (and pool) the noise, embed the condition, MLP, zero-initialised raw head.

    ``Predictor(config)`` with ``config.blind`` is the blind ablation: the same output capacity (grid, Δτ, γ
    per step; still conditional if the config has a condition) without the instance input.
    """

    def __init__(self, config: PredictorConfig, base: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self._init_base(base)
        c, h = config, config.hidden
        self.x_in = nn.Linear(c.num_features, h) if c.num_features else None
        self.class_in = nn.Linear(c.num_classes, h, bias=False) if c.num_classes else None
        self.cond_in = nn.Linear(c.cond_dim, h, bias=False) if c.cond_dim else None
        has_input = any(m is not None for m in (self.x_in, self.class_in, self.cond_in))
        self.trunk = nn.Sequential(*[m for _ in range(c.depth - 1) for m in (nn.SiLU(), nn.Linear(h, h))],
                                   nn.SiLU()) if has_input else None
        self.out = nn.Linear(h, c.schedule.width, bias=False) if has_input else None
        if self.out is not None:
            nn.init.zeros_(self.out.weight)  # the residual starts at 0: phi reproduces ``base`` exactly

    def features(self, x_T: Tensor) -> Tensor:
        """Unit-variance noise features ``[B, F]`` (pooled when ``config.pool`` is set)."""
        c = self.config
        if tuple(x_T.shape[1:]) != c.shape:
            raise ValueError(f"x_T has sample shape {tuple(x_T.shape[1:])}, the predictor expects {c.shape}")
        eps = x_T * c.input_scale
        if c.pool is not None:
            h, w = c.shape[1:]
            eps = F.adaptive_avg_pool2d(eps, c.pool) * math.sqrt(h * w / c.pool ** 2)
        return eps.flatten(1)

    def residual(self, x_T: Tensor, cond: Tensor | None, index: Tensor | None) -> Tensor | None:
        c = self.config
        if self.out is None:  # blind and unconditional: one global schedule
            return None
        dtype = self.out.weight.dtype
        hidden = None
        if self.x_in is not None:
            hidden = self.x_in(self.features(x_T).to(dtype))
        if self.class_in is not None or self.cond_in is not None:
            if cond is None:
                raise ValueError("this predictor is conditional: pass cond (class labels [B] or embeddings)")
            if self.class_in is not None:
                if cond.ndim != 1:
                    raise ValueError(f"cond must be class labels [B], got shape {tuple(cond.shape)}")
                e = self.class_in(F.one_hot(cond.long(), c.num_classes).to(dtype) * c.class_scale)
            else:
                if cond.ndim != 2 or cond.shape[1] != c.cond_dim:
                    raise ValueError(f"cond must be [B, {c.cond_dim}], got shape {tuple(cond.shape)}")
                e = self.cond_in(cond.to(dtype))
            hidden = e if hidden is None else hidden + e
        return self.out(self.trunk(hidden))

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path, **metadata: Any) -> Path:
        """Write safetensors with the config (and any extra JSON-able ``metadata``) in the header."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "config": self.config.to_json(),
                "checksum": _checksum(tensors, self.config), "metadata": metadata}
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(tensors, str(tmp), metadata={"indis": json.dumps(meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, nfe: int | None = None, solver: str | None = None,
             backbone: str | None = None, map_location: str | torch.device = "cpu") -> Predictor:
        """Load a checkpoint; refuse a corrupt file or one tuned for another NFE, solver or backbone.

        The configuration is validated and matched against the stored tensor shapes before anything is
        allocated, and the checksum covers the configuration as well as the tensors.
        """
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        path = checkpoint_file(path, "predictor checkpoint")
        try:
            with safe_open(str(path), "pt") as f:
                header = f.metadata() or {}
            shapes, nbytes = stored_tensors(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors predictor checkpoint ({e})") from e
        try:
            meta = json.loads(header["indis"])
            fmt = meta.get("format")
        except (AttributeError, KeyError, TypeError, ValueError, RecursionError) as e:
            raise ValueError(f"{path} has no valid indis predictor metadata ({type(e).__name__}: {e})") from e
        check_format(fmt, str(path))
        try:
            config = PredictorConfig.from_json(meta["config"])
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError, RecursionError) as e:
            raise ValueError(f"{path} has no valid indis predictor metadata ({type(e).__name__}: {e})") from e
        check_shapes(lambda: cls(config, base=torch.zeros(config.schedule.width)), shapes, str(path), nbytes)
        tensors = load_file(str(path), device="cpu")
        if _checksum(tensors, config) != meta.get("checksum"):
            raise ValueError(f"{path} is corrupt: its tensors or configuration do not match the checksum in "
                             f"its metadata")
        for name, want, have in (("NFE", nfe, config.schedule.nfe), ("solver", solver, config.solver),
                                 ("backbone", backbone, config.backbone)):
            if want is not None and want != have:
                raise ValueError(f"{path} was tuned for {name}={have!r}, but {name}={want!r} was requested; "
                                 f"a schedule predictor only fits the NFE, solver and backbone it was tuned "
                                 f"with -- tune a new one (indis fit)")
        model = cls(config, base=tensors["base"])
        model.load_state_dict(tensors)
        model.metadata = meta.get("metadata", {})
        return model.to(map_location).eval()


class PerInstanceSchedule(_Head):
    """Per-instance oracle: free raw parameters per sample (``index`` picks rows) on top of a fixed ``base``
    (the heuristic, or a fitted global schedule to start from).

    Fitted directly on the very samples it is evaluated on -- the upper bound a predictor can approach.
    """

    def __init__(self, config: PredictorConfig, num_samples: int, base: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self._init_base(base)
        self.base.requires_grad_(False)
        self.delta = nn.Parameter(torch.zeros(num_samples, config.schedule.width, dtype=torch.float64))

    def residual(self, x_T: Tensor, cond: Tensor | None, index: Tensor | None) -> Tensor:
        if index is None:
            raise ValueError("PerInstanceSchedule needs index= (the rows of the samples it was fitted on)")
        return self.delta[index]


def check_format(fmt: object, what: str) -> None:
    """Refuse a predictor file of another format than :data:`FORMAT`, saying why."""
    if fmt == FORMAT:
        return
    if fmt is None:
        raise ValueError(f"{what} has no valid indis predictor metadata (no format field)")
    if fmt in RETIRED_FORMATS:
        raise ValueError(f"{what} is an {fmt} predictor, which this version refuses: {RETIRED_FORMATS[fmt]}")
    raise ValueError(f"{what} has predictor format {fmt!r}, expected {FORMAT!r}")


def _checksum(tensors: dict[str, Tensor], config: PredictorConfig) -> str:
    return state_checksum(tensors, config.to_json())


__all__ = ["FORMAT", "HEURISTICS", "PerInstanceSchedule", "Predictor", "PredictorConfig", "ScheduleConfig"]
