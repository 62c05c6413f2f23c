"""Seeds, initial states and cached teacher end points for tuning schedules (INDIS / LD3 tuning data).

x_T is never stored: each sample is a seed, and :func:`noise_from_seeds` regenerates its standard-normal noise
bit-exactly in any process (one CPU ``torch.Generator`` per seed, so sample i's noise does not depend on the
batch it is drawn in). Teacher end points -- the same backbone solved with a many-step solver (iPNDM, 30 steps
by default) or an exact reference -- are written once into safetensors shards, one per seed range, under a
directory named by a hash of everything that determines them; shards are aligned seed blocks, written
atomically, so an interrupted build resumes at the first missing shard and any seed range reuses them.

Conditions beyond class labels (text embeddings, pooled embeddings, nested inputs) come from a user's
function of the seeds (e.g. the embeddings of ``prompts[seed % len(prompts)]``): they are stored in the shards
with the seeds, so the tuning data is what the teacher saw.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from indis.engine.core.conditions import Cond, check_batch, flatten, select, unflatten
from indis.engine.core.families import NoiseFamily, get_family
from indis.engine.core.guidance import guidance_key

LABEL_STREAM = 0x5EED1AB3  # offset of the label generator seed from the noise seed


def noise_from_seeds(seeds: Sequence[int] | Tensor, shape: Sequence[int], *,
                     dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Standard-normal noise ``[B, *shape]``, row i drawn from its own generator seeded with ``seeds[i]``."""
    seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, Tensor) else seeds)]
    if any(s < 0 for s in seeds):
        raise ValueError("seeds must be non-negative integers")
    out = torch.empty(len(seeds), *shape, dtype=torch.float32)  # drawn in float32 whatever the default
    draw_noise(out.unbind(0), seeds, torch.Generator())
    return out.to(dtype=dtype, device=device)


def draw_noise(rows: Sequence[Tensor], seeds: Sequence[int], generator: torch.Generator) -> None:
    """Fill float32 CPU ``rows[i]`` in place with the standard-normal noise of (valid) seed ``seeds[i]``:
    ``generator`` re-seeded per row draws what a fresh generator's ``torch.randn`` does (the definition
    :func:`noise_from_seeds` uses; a caller drawing many small batches reuses its rows and generator)."""
    for row, s in zip(rows, seeds, strict=True):
        row.normal_(generator=generator.manual_seed(s))  # manual_seed resets the whole state


def labels_from_seeds(seeds: Sequence[int] | Tensor, num_classes: int,
                      device: torch.device | str | None = None) -> Tensor:
    """Class labels ``[B]`` drawn uniformly per seed (a generator stream separate from the noise)."""
    seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, Tensor) else seeds)]
    labels = [int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(s + LABEL_STREAM)))
              for s in seeds]
    return torch.tensor(labels, dtype=torch.long, device=device)


def noise_scale(sigma_max: float, family: NoiseFamily | str = "ve") -> float:
    """The state's noise scale at ``sigma_max``, ``family.s(sigma_max)`` (sigma itself for VE)."""
    return float(get_family(family).s(torch.tensor(sigma_max, dtype=torch.float64)))


def initial_state(noise: Tensor, sigma_max: float, family: NoiseFamily | str = "ve") -> Tensor:
    """The sampler's start ``x_T`` in the family's coordinate: ``family.s(sigma_max) * noise``."""
    return noise * noise_scale(sigma_max, family)


@dataclass(frozen=True)
class TeacherSpec:
    """How teacher end points are made. ``solver="exact"`` uses ``testbeds.reference_solve`` (GMM only)."""

    solver: str = "ipndm"
    steps: int = 30
    schedule: str = "edm"
    rho: float = 7.0


#: ``conditions(seeds [M]) -> (cond, phi_cond)``: the model's condition inputs (a dict of ``[M, ...]``
#: tensors, nested allowed) and phi's condition ``[M, D]`` (or None) for those seeds.
Conditions = Callable[[Tensor], tuple[Cond, Tensor | None]]


@dataclass(frozen=True)
class TuningData:
    """Seeds, their regenerated initial states, optional class labels, and teacher end points (one split);
    with conditions beyond class labels, ``cond`` (what the model receives, ``[M, ...]`` leaves) and
    ``phi_cond`` (what the predictor reads, ``[M, D]``, e.g. a pooled text embedding)."""

    seeds: Tensor      # [M] int64
    x_T: Tensor        # [M, *shape]
    labels: Tensor | None
    x0: Tensor         # [M, *shape] teacher end points
    cond: Cond | None = field(default=None)
    phi_cond: Tensor | None = None

    def __len__(self) -> int:
        return self.seeds.shape[0]

    def subset(self, index: Tensor) -> TuningData:
        return TuningData(self.seeds[index], self.x_T[index],
                          None if self.labels is None else self.labels[index], self.x0[index],
                          select(self.cond, index), None if self.phi_cond is None else self.phi_cond[index])

    def model_cond(self) -> Cond | None:
        """The model's condition inputs: ``cond``, else the class labels as ``class_labels``, else None."""
        if self.cond is not None:
            return self.cond
        return None if self.labels is None else {"class_labels": self.labels}

    def head_cond(self) -> Tensor | None:
        """The predictor's condition: ``phi_cond``, else the class labels, else None."""
        return self.phi_cond if self.phi_cond is not None else self.labels


class TeacherCache:
    """Teacher end points on disk, sharded by seed range and keyed by what determines them.

    ``key`` names the backbone and everything that changes the end points (family, sigma range, shape,
    teacher spec, classes, dtype, the model's guidance, the conditions' name); shards live in
    ``root / <hash of key>`` as ``seeds_<a>_<b>.safetensors``. ``conditions``: a function of the seeds
    (:data:`Conditions`) named by ``conditions_key`` (e.g. the prompt list's name): its outputs are stored
    in the shards beside the end points. ``guidance``: the model's ``guidance.guidance_key`` (or None).
    """

    def __init__(self, root: str | Path, *, backbone: str, shape: Sequence[int], sigma_min: float,
                 sigma_max: float, family: str = "ve", final_zero: bool = False,
                 teacher: TeacherSpec = TeacherSpec(), num_classes: int = 0, shard_size: int = 256,
                 dtype: torch.dtype = torch.float32, conditions: Conditions | None = None,
                 conditions_key: str = "", guidance: dict | None = None) -> None:
        if conditions is not None and (num_classes or not conditions_key):
            raise ValueError("conditions need a conditions_key naming them (it enters the cache key) and "
                             "replace class labels (num_classes=0)")
        self.shape, self.family, self.teacher = tuple(int(s) for s in shape), family, teacher
        self.sigma_min, self.sigma_max, self.final_zero = sigma_min, sigma_max, final_zero
        self.num_classes, self.shard_size, self.dtype = num_classes, shard_size, dtype
        self.conditions = conditions
        self.key = {"backbone": backbone, "shape": list(self.shape), "sigma_min": sigma_min,
                    "sigma_max": sigma_max, "family": family, "final_zero": final_zero,
                    "teacher": asdict(teacher), "num_classes": num_classes, "dtype": str(dtype),
                    "shard_size": shard_size}
        if conditions is not None or guidance is not None:  # absent otherwise: older caches keep their key
            self.key.update(conditions=conditions_key, guidance=guidance)
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / digest

    # ------------------------------------------------------------------------------------------- teacher
    def teacher_grid(self) -> Tensor:
        from indis.engine.core.schedules import get_sigmas

        t = self.teacher
        return get_sigmas(t.schedule, t.steps, self.sigma_min, self.sigma_max, rho=t.rho, family=self.family,
                          final_zero=self.final_zero)

    def solve(self, model: Callable[..., Tensor], x_T: Tensor, labels: Tensor | None,
              cond: Cond | None = None) -> Tensor:
        """Teacher end points for initial states ``x_T`` (the model's inputs ``cond``, else the labels)."""
        if cond is None:
            cond = {} if labels is None else {"class_labels": labels}
        with torch.no_grad():
            if self.teacher.solver == "exact":
                from indis.engine.testbeds.mixtures import reference_solve

                end = 0.0 if self.final_zero else self.sigma_min
                return reference_solve(model, x_T, self.sigma_max, end, cond=cond).to(x_T.dtype)
            from indis.engine.core.sampling import sample

            return sample(model, x_T, self.teacher_grid(), self.teacher.solver, cond=cond)

    def inputs(self, ids: Tensor, device: torch.device | str | None = None) -> tuple[Tensor, Tensor | None]:
        """Regenerated initial states ``x_T`` and class labels (None without classes) of seeds ``ids``."""
        x_T = initial_state(noise_from_seeds(ids, self.shape, dtype=self.dtype, device=device),
                            self.sigma_max, self.family)
        return x_T, labels_from_seeds(ids, self.num_classes, device) if self.num_classes else None

    def condition_tensors(self, ids: Tensor, device: torch.device | str | None) -> dict[str, Tensor]:
        """The conditions of seeds ``ids`` as shard entries (``cond.<path>``, ``phi_cond``), checked."""
        cond, phi = self.conditions(ids)
        dev = torch.device("cpu") if device is None else torch.device(device)
        what = "conditions(seeds)"
        flat = check_batch({k: v.to(dev) for k, v in flatten(cond, what).items()}, len(ids), dev, what)
        out = {f"cond.{k}": v for k, v in flat.items()}
        if phi is not None:
            if not isinstance(phi, Tensor) or phi.ndim != 2 or phi.shape[0] != len(ids):
                raise ValueError(f"conditions(seeds) must return phi's condition as [{len(ids)}, D], got "
                                 f"{getattr(phi, 'shape', type(phi).__name__)}")
            out["phi_cond"] = phi.to(dev)
        return out

    # ------------------------------------------------------------------------------------------- storage
    def _shards(self, seeds: range) -> list[tuple[int, int]]:
        """The aligned blocks ``[k*S, (k+1)*S)`` that cover ``seeds`` (so any range reuses the same files)."""
        if seeds.step != 1 or seeds.start < 0 or len(seeds) == 0:
            raise ValueError(f"seeds must be a non-empty range(start, stop) with start >= 0, got {seeds}")
        size = self.shard_size
        first = seeds.start // size * size
        return [(a, a + size) for a in range(first, seeds.stop, size)]

    def _path(self, a: int, b: int) -> Path:
        return self.dir / f"seeds_{a:09d}_{b:09d}.safetensors"

    def build(self, model: Callable[..., Tensor], seeds: range, *, rank: int = 0, world_size: int = 1,
              progress: bool = True) -> None:
        """Write every missing shard of ``seeds`` (shard i goes to rank i mod world_size); resumable. A model
        whose guidance (``guidance.guidance_key``) is not the one in this cache's key is refused: its end
        points would be stored under another model's key."""
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        if guidance_key(model) != self.key.get("guidance"):
            raise ValueError(f"the model's guidance {guidance_key(model)} is not this cache's "
                             f"{self.key.get('guidance')}: build the TeacherCache with "
                             f"guidance=guidance_key(model)")
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / "key.json"
        if not key_file.exists():
            key_file.write_text(json.dumps(self.key, indent=1, sort_keys=True))
        todo = [s for i, s in enumerate(self._shards(seeds))
                if i % world_size == rank and not self._path(*s).exists()]
        device = next((p.device for p in getattr(model, "parameters", list)()), torch.device("cpu"))
        for a, b in tqdm(todo, desc="teacher shards", disable=not progress or not todo):
            ids = torch.arange(a, b)
            x_T, labels = self.inputs(ids, device)
            extra = {} if self.conditions is None else self.condition_tensors(ids, device)
            cond = unflatten({k.removeprefix("cond."): v for k, v in extra.items() if k.startswith("cond.")})
            x0 = self.solve(model, x_T, labels, cond if self.conditions else None)
            entries = {"seeds": ids, "x0": x0.to(self.dtype).cpu().contiguous(),
                       **{k: v.detach().cpu().contiguous() for k, v in extra.items()}}
            path = self._path(a, b)
            tmp = path.with_suffix(".tmp")
            save_file(entries, str(tmp), metadata={"key": json.dumps(self.key)})
            tmp.replace(path)  # atomic: a shard is either complete or absent

    def load(self, seeds: range, device: torch.device | str | None = None) -> TuningData:
        """Seeds ``seeds`` with regenerated x_T, labels and their cached teacher end points."""
        from safetensors.torch import load_file

        shards = []
        blocks = self._shards(seeds)
        for a, b in blocks:
            path = self._path(a, b)
            if not path.exists():
                raise FileNotFoundError(f"teacher shard {path} is missing; call TeacherCache.build first")
            shard = load_file(str(path))
            if not torch.equal(shard["seeds"], torch.arange(a, b)):
                raise ValueError(f"teacher shard {path} holds other seeds than its name says")
            if (self.conditions is not None) != any(k.startswith("cond.") for k in shard):
                raise ValueError(f"teacher shard {path} does not hold the conditions this cache expects")
            if self.conditions is not None:
                fresh = self.condition_tensors(torch.arange(a, b), "cpu")
                if set(fresh) != {k for k in shard if k.startswith("cond.") or k == "phi_cond"} or not all(
                        torch.equal(v.to(shard[k].dtype), shard[k]) for k, v in fresh.items()):
                    raise ValueError(f"conditions(seeds) for seeds {a}..{b - 1} differ from those stored in "
                                     f"{path}: the conditions changed under conditions_key="
                                     f"{self.key['conditions']!r}; give them another key")
            shards.append(shard)
        offset = seeds.start - blocks[0][0]
        rows = slice(offset, offset + len(seeds))
        entries = {k: torch.cat([s[k] for s in shards])[rows].to(device) for k in shards[0] if k != "seeds"}
        ids = torch.arange(seeds.start, seeds.stop)
        cond = unflatten({k.removeprefix("cond."): v for k, v in entries.items() if k.startswith("cond.")})
        x_T, labels = self.inputs(ids, device)
        return TuningData(ids, x_T, labels, entries["x0"], cond or None, entries.get("phi_cond"))


__all__ = ["Conditions", "TeacherCache", "TeacherSpec", "TuningData", "initial_state", "labels_from_seeds",
           "noise_from_seeds", "noise_scale"]
