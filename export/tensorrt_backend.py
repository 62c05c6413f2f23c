"""TensorRT backend: engines built from the exported ONNX files, run with ``execute_async_v3``.

UNVERIFIED ON HARDWARE: TensorRT cannot be installed on the project's machines, so the parts that call it
(:func:`build_engine`, :class:`TrtModel`) have never run. What needs no TensorRT -- cache keys, profiles from
the export metadata, batch checks, precision rules -- is unit-tested.

* Build: one optimisation profile over the batch axis (min/opt/max from ``--batch-min/opt/max``), builder
  optimisation level, a persistent timing cache, and precision either float32 or *strongly typed* float16 /
  bfloat16 (the ONNX file already carries the types: export it with ``--fp16``; TensorRT then keeps them
  instead of choosing per layer).
* Engine cache: ``<engine_dir>/<name>-<key>.plan`` with ``key`` = SHA-256 over the ONNX file's hash, the
  TensorRT version, the GPU name and compute capability, the profile, the precision and the optimisation
  level.
  Any change builds a new engine; ``force=True`` rebuilds.
* Run: static input/output buffers per batch size whose addresses are bound to the context once
  (``set_tensor_address``), inputs copied in, ``execute_async_v3`` on torch's current CUDA stream, optionally
  replayed from a CUDA graph captured after one warm-up run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .models import check_feeds
from .onnx_export import file_sha256, spec_from_onnx, verify_export

log = logging.getLogger("indis.export")
PRECISIONS = ("fp32", "fp16", "bf16")
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None when it cannot be imported."""
    try:
        import tensorrt as trt
    except Exception:  # noqa: BLE001 - stub wheels raise odd errors at import time
        return None
    return str(trt.__version__)


def profile_from_metadata(meta: dict[str, str], batch_min: int | None = None, batch_opt: int | None = None,
                          batch_max: int | None = None) -> Profile:
    """Optimisation profile from an exported file's metadata (the batch range may be narrowed; other
    dynamic axes, e.g. a text's sequence length, take their exported (min, opt, max))."""
    if "indis.inputs" not in meta:
        raise ValueError("this ONNX file has no indis export metadata; export it with `indis export`")
    lo, hi = int(meta["indis.batch_min"]), int(meta["indis.batch_max"])
    b = (batch_min or lo, batch_opt or int(meta["indis.batch_opt"]), batch_max or hi)
    if not lo <= b[0] <= b[1] <= b[2] <= hi:
        raise ValueError(f"engine batch range {b} must lie within the exported range [{lo}, {hi}] and be "
                         "ordered min <= opt <= max")
    axes = json.loads(meta.get("indis.axes", "{}"))
    out: Profile = {}
    for name, shape, _ in json.loads(meta["indis.inputs"]):
        out[name] = tuple(tuple(v if d == "batch" else axes[d][k] if isinstance(d, str) else int(d)  # type: ignore[misc]
                                for d in shape) for k, v in enumerate(b))
    return out


def engine_cache_key(onnx_hash: str, trt_version: str, gpu: str, profile: Profile, precision: str,
                     opt_level: int) -> str:
    """Everything an engine depends on, hashed (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {PRECISIONS}")
    blob = json.dumps({"onnx": onnx_hash, "trt": trt_version, "gpu": gpu, "precision": precision,
                       "opt_level": opt_level, "profile": {k: [list(s) for s in v] for k, v in
                                                           sorted(profile.items())}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def gpu_identity(device: torch.device | None = None) -> str:
    """GPU name and compute capability (engines are not portable across either)."""
    device = device or torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"


def check_precision(precision: str, meta: dict[str, str]) -> None:
    """Strongly typed engines take their precision from the ONNX file: the two must agree."""
    exported = meta.get("indis.precision", "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {PRECISIONS}")
    if precision != "fp32" and exported != precision:
        raise ValueError(f"a strongly typed {precision} engine needs an ONNX file exported in {precision} "
                         f"(this one is {exported}): re-export with --{precision}")


def build_engine(onnx_path: str | Path, engine_dir: str | Path, *, precision: str = "fp32",
                 opt_level: int = 3, batch_min: int | None = None, batch_opt: int | None = None,
                 batch_max: int | None = None, timing_cache: str | Path | None = None, force: bool = False,
                 workspace_bytes: int | None = None) -> Path:
    """Build (or reuse from the cache) a TensorRT engine for an exported ONNX file; returns the plan path."""
    import tensorrt as trt

    onnx_path = Path(onnx_path)
    verify_export(onnx_path)
    meta = spec_from_onnx(onnx_path)
    check_precision(precision, meta)
    profile = profile_from_metadata(meta, batch_min, batch_opt, batch_max)
    key = engine_cache_key(file_sha256(onnx_path), trt.__version__, gpu_identity(), profile, precision,
                           opt_level)
    plan = Path(engine_dir) / f"{meta.get('indis.name', onnx_path.stem)}-{key}.plan"
    if plan.is_file() and not force:
        log.info("engine cache hit: %s", plan)
        return plan
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if precision != "fp32" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    log.info("building TensorRT engine %s (%s, opt level %d) ...", plan.name, precision, opt_level)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} (see its log above)")
    plan.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(plan)
    if timing_cache:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan


@dataclass
class _Bound:
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]
    graph: torch.cuda.CUDAGraph | None = None


class TrtModel:
    """A deserialised engine with buffers bound once per batch size (the ``run(feeds)`` runner interface)."""

    def __init__(self, plan: str | Path, *, cuda_graph: bool = False,
                 device: torch.device | None = None) -> None:
        import tensorrt as trt

        self.trt, self.path = trt, Path(plan)
        if not self.path.is_file():
            raise FileNotFoundError(f"TensorRT engine {self.path} does not exist (build it: `indis export`)")
        self.device = device or torch.device("cuda")
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ValueError(f"{self.path} is not a TensorRT engine for this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.input_names]
        self.inputs = {n: n for n in self.input_names}
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_names[0], 0)
        self.batch_range = (int(lo[0]), int(hi[0]))
        self.cuda_graph, self.provider, self.metadata = cuda_graph, "TensorRT", {}
        self._bound: dict[int, _Bound] = {}

    def _dtype(self, name: str) -> torch.dtype:
        trt = self.trt
        return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                trt.int64: torch.int64, trt.int32: torch.int32}[self.engine.get_tensor_dtype(name)]

    def _bind(self, shapes: dict[str, tuple[int, ...]]) -> _Bound:
        for name, shape in shapes.items():
            self.context.set_input_shape(name, shape)
        ins = {n: torch.empty(s, dtype=self._dtype(n), device=self.device) for n, s in shapes.items()}
        outs = {n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtype(n),
                               device=self.device) for n in self.outputs}
        return _Bound(ins, outs)

    def run(self, feeds: dict[str, Tensor]) -> list[Tensor]:
        batch = check_feeds(self.path.name, self.input_names, feeds, self.batch_range,
                            "was built for (its optimisation profile)")
        bound = self._bound.get(batch)
        if bound is None:
            bound = self._bound[batch] = self._bind({k: tuple(v.shape) for k, v in feeds.items()})
        for k, v in feeds.items():
            bound.inputs[k].copy_(v)
        for name, t in (*bound.inputs.items(), *bound.outputs.items()):  # one context, many batch sizes
            self.context.set_tensor_address(name, t.data_ptr())
        for name, t in bound.inputs.items():
            self.context.set_input_shape(name, tuple(t.shape))
        stream = torch.cuda.current_stream(self.device)
        if self.cuda_graph and bound.graph is None:
            self.context.execute_async_v3(stream.cuda_stream)  # warm-up before capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # captured on torch's side stream, replayed on the current one
                self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
            bound.graph = graph
        if bound.graph is not None:
            bound.graph.replay()
        elif not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.path.name} failed")
        return [bound.outputs[n].clone() for n in self.outputs]
