"""Conditions as trees of tensors with a batch axis: what a network receives besides the state and the time
(class labels ``[B]``, text embeddings ``[B, L, D]``, pooled embeddings ``[B, D]``, and nested dicts such as
SDXL's ``added_cond_kwargs``). A leaf is addressed by its dotted path (``"added_cond_kwargs.text_embeds"``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

Cond = Mapping[str, Any]  # str -> Tensor | Cond


def flatten(cond: Cond | None, name: str = "cond", leaves: tuple[type, ...] = (Tensor,)) -> dict[str, Any]:
    """The leaves of ``cond`` by dotted path, in insertion order; ``ValueError`` for a leaf that is not a
    tensor (or another of the ``leaves`` types) or a key that is not a string or holds a dot."""
    out: dict[str, Tensor] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if not isinstance(k, str) or not k or "." in k:
                    raise ValueError(f"{name}: key {k!r} at {path or 'the top'} must be a non-empty string "
                                     f"without dots")
                walk(v, f"{path}.{k}" if path else k)
        elif isinstance(node, leaves) and not isinstance(node, bool):
            out[path] = node
        else:
            kinds = " or ".join(t.__name__ for t in leaves)
            raise ValueError(f"{name}[{path!r}] must be a {kinds} or a dict of them, "
                             f"got {type(node).__name__}")

    if cond is not None:
        if not isinstance(cond, Mapping):
            raise ValueError(f"{name} must be a dict of tensors, got {type(cond).__name__}")
        walk(cond, "")
    return out


def unflatten(flat: Mapping[str, Tensor]) -> dict[str, Any]:
    """The tree whose :func:`flatten` is ``flat``."""
    out: dict[str, Any] = {}
    for path, v in flat.items():
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def check_batch(cond: Cond | None, batch: int, device: torch.device, name: str = "cond",
                broadcast: bool = False) -> dict[str, Tensor]:
    """Flattened leaves of ``cond``, each a tensor on ``device`` with ``batch`` rows (``broadcast``: or one,
    e.g. a negative prompt shared by the batch); ``ValueError`` naming the leaf otherwise."""
    flat = flatten(cond, name)
    for path, v in flat.items():
        rows = v.shape[0] if v.ndim else None
        if v.device != device or not (rows == batch or (broadcast and rows == 1)):
            one = " (or 1)" if broadcast else ""
            raise ValueError(f"{name}[{path!r}] must be a tensor on {device} with batch size {batch}{one}, "
                             f"got shape {tuple(v.shape)} on {v.device}")
    return flat


def expand(cond: Cond, batch: int) -> dict[str, Any]:
    """``cond`` with every leaf of batch size 1 expanded to ``batch`` rows (a view)."""
    return unflatten({k: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v
                      for k, v in flatten(cond).items()})


def concat(conds: Sequence[Cond]) -> dict[str, Any]:
    """The trees ``conds`` (same paths, same shapes after the batch axis) joined along the batch axis."""
    flats = [flatten(c) for c in conds]
    first = flats[0]
    for f in flats[1:]:
        if list(f) != list(first):
            raise ValueError(f"conditions have different inputs: {sorted(first)} and {sorted(f)}")
        for k, v in f.items():
            if v.shape[1:] != first[k].shape[1:]:
                raise ValueError(f"condition {k!r} has shapes {tuple(first[k].shape[1:])} and "
                                 f"{tuple(v.shape[1:])} after the batch axis")
    return unflatten({k: torch.cat([f[k] for f in flats]) for k in first})


def select(cond: Cond | None, index: Tensor | slice) -> dict[str, Any] | None:
    """Rows ``index`` of every leaf (None stays None)."""
    if cond is None:
        return None
    return unflatten({k: v[index] for k, v in flatten(cond).items()})


def lookup(cond: Cond, path: str) -> Tensor:
    """The leaf at dotted ``path``; ``KeyError`` naming the inputs there are."""
    flat = flatten(cond)
    if path not in flat:
        raise KeyError(f"no condition input {path!r}; have {sorted(flat)}")
    return flat[path]


def pick(reader: str | Callable[[Cond], Tensor] | None, cond: Cond) -> Tensor | None:
    """What a predictor reads from ``cond``: the leaf at a dotted path, a function of the tree, or nothing
    (None)."""
    if reader is None:
        return None
    return reader(cond) if callable(reader) else lookup(cond, reader)


__all__ = ["Cond", "check_batch", "concat", "expand", "flatten", "lookup", "pick", "select", "unflatten"]
