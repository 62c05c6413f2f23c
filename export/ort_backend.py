"""onnxruntime backend: a checked session over an exported file (``indis.export.backends`` wraps it).

:class:`OrtModel` opens a session and checks what it actually got: onnxruntime-gpu silently falls back to
the CPU provider when CUDA or TensorRT cannot start (it only logs), so the providers a session runs
(``session.get_providers()``) are compared with the ones requested; a fallback is logged with both lists, kept
in ``fallback``, and is an error with ``strict=True``. CUDA tensors go through IO binding (no host copies);
CPU tensors through numpy. Batch sizes outside the exported range are refused with the range in the message.
An indis export is verified against the content hash in its metadata before the session opens
(``onnx_export.verify_export``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .models import check_feeds
from .onnx_export import verify_export

log = logging.getLogger("indis.export")

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}
_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
          "tensor(int32)": torch.int32, "tensor(double)": torch.float64}


def _bindable(shape: list) -> list[int | None] | None:
    """An output's shape as the graph declares it, the batch axis (first, symbolic) as None; None when
    another axis is symbolic too (then its size is unknown before the run and it is not bound)."""
    dims = [d if isinstance(d, int) and d >= 0 else None for d in shape]
    return dims if dims and all(d is not None for d in dims[1:]) else None


def default_providers() -> list[str]:
    """CUDA then CPU where this onnxruntime build has CUDA, else CPU (TensorRT: the TensorRT backend)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtModel:
    """One onnxruntime session over an exported file (see the module docstring)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, *, strict: bool = False,
                 session_options: object | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"ONNX file {self.path} does not exist (create it with `indis export`)")
        verify_export(self.path)  # also refuses a directory or FIFO
        requested = list(providers or default_providers())
        available = ort.get_available_providers()
        usable = [p for p in requested if p in available]
        for p in requested:
            if p not in available:
                log.warning("onnxruntime provider %s is not in this build (available: %s)", p, available)
        try:
            self.session = ort.InferenceSession(str(self.path), session_options,
                                                providers=usable or ["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ValueError(f"{self.path} could not be loaded by onnxruntime: it is missing data, corrupt "
                             f"or not an ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
                             ) from e
        self.requested, self.providers = requested, self.session.get_providers()
        self.fallback: str | None = None
        if requested and self.providers[0] != requested[0]:
            self.fallback = (f"requested providers {requested}, but the session runs {self.providers} "
                             f"(onnxruntime fell back to {self.providers[0]})")
            if strict:
                raise RuntimeError(f"{self.path}: {self.fallback}")
            log.warning("%s: %s", self.path.name, self.fallback)
        log.info("%s runs on %s", self.path.name, self.provider)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.batch_range = (int(meta.get("indis.batch_min", 1)), int(meta.get("indis.batch_max", 1 << 30)))
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self._out_shapes = {o.name: _bindable(o.shape) for o in self.session.get_outputs()}

    @property
    def provider(self) -> str:
        """The provider that runs the graph (first of ``session.get_providers()``)."""
        return self.providers[0]

    def input_dtype(self, name: str) -> torch.dtype:
        return _TORCH.get(self.inputs[name].type, torch.float32)

    def run(self, feeds: dict[str, Tensor]) -> list[Tensor]:
        """Run with torch tensors; outputs come back on the device of the first input."""
        batch = check_feeds(self.path.name, list(self.inputs), feeds, self.batch_range, "was exported for")
        feeds = {k: v.to(self.input_dtype(k)).contiguous() for k, v in feeds.items()}
        device = next(iter(feeds.values())).device
        bindable = all(s is not None for s in self._out_shapes.values())
        if device.type == "cuda" and self.provider == "CUDAExecutionProvider" and bindable:
            return self._run_bound(feeds, batch, device)
        out = self.session.run(None, {k: v.detach().cpu().numpy() for k, v in feeds.items()})
        return [torch.from_numpy(np.ascontiguousarray(o)).to(device) for o in out]

    def _run_bound(self, feeds: dict[str, Tensor], batch: int, device: torch.device) -> list[Tensor]:
        """IO binding: inputs and outputs stay in torch's CUDA memory (outputs sized by the graph's own
        declared shapes, never by metadata)."""
        binding = self.session.io_binding()
        for k, v in feeds.items():
            binding.bind_input(k, "cuda", device.index or 0, _NP[v.dtype], list(v.shape), v.data_ptr())
        outs = []
        for name in self.outputs:
            shape = [batch if d is None else d for d in self._out_shapes[name]]
            dtype = _TORCH[self.session.get_outputs()[self.outputs.index(name)].type]
            t = torch.empty(shape, dtype=dtype, device=device)
            binding.bind_output(name, "cuda", device.index or 0, _NP[dtype], shape, t.data_ptr())
            outs.append(t)
        torch.cuda.current_stream(device).synchronize()  # onnxruntime runs on its own stream
        self.session.run_with_iobinding(binding)
        return outs
