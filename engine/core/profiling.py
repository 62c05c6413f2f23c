"""NVTX ranges for Nsight Systems: predictor, coefficient build, each denoiser call and each fused step.

Uses the ``nvtx`` package (domain ``indis``); without it, or with ``INDIS_NVTX=0``, every range is a no-op.
``torch.cuda.nvtx`` is not used: CPU builds of torch lack it. With no profiler attached the NVTX library's
calls are stubs; a pushed and popped range costs about 0.1 us of Python here (attributes are cached per name).
"""

from __future__ import annotations

import os

try:
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - nvtx is a dependency, but stay usable without it
    _nvtx = None


class _Range:
    __slots__ = ("_attributes", "_domain")

    def __init__(self, domain, name: str) -> None:
        self._domain = domain
        self._attributes = domain.get_event_attributes(message=name) if domain is not None else None

    def __enter__(self) -> None:
        if self._domain is not None:
            self._domain.push_range(self._attributes)

    def __exit__(self, *exc: object) -> None:
        if self._domain is not None:
            self._domain.pop_range()


_ON = _nvtx is not None and os.environ.get("INDIS_NVTX", "1") != "0"
_DOMAIN = _nvtx.get_domain("indis") if _ON else None
_CACHE: dict[str, _Range] = {}


def nvtx_range(name: str) -> _Range:
    """A reusable context manager that marks ``name`` on the ``indis`` NVTX domain (no-op without nvtx)."""
    rng = _CACHE.get(name)
    if rng is None:
        rng = _CACHE[name] = _Range(_DOMAIN, name)
    return rng


def enabled() -> bool:
    """Whether ranges are emitted (the nvtx package is importable and INDIS_NVTX is not 0)."""
    return _DOMAIN is not None
