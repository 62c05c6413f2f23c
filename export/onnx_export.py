"""ONNX export of an :class:`~indis.export.models.ExportSpec`: dynamo exporter, the legacy one as fallback.

Opset >= 19, float32 or float16 (the module and its floating inputs cast; TensorRT builds float16 ONNX files
as strongly typed networks), external data above ``EXTERNAL_DATA_BYTES`` of weights (or on request),
``onnx.checker`` on the result, and the spec (names, batch range, kind) stored in the file's metadata so a
loader can check what it runs. Every export is verified against torch on sample inputs at two batch sizes.

Integrity: ``indis.content_sha256`` in the metadata is a SHA-256 over every byte of the file and its
external-data side file, computed with that value's own 64 bytes read as zeros (the value is patched in place
after the hash, which changes no other byte). :func:`verify_export` recomputes it in one streaming pass
before a backend loads the file -- a flipped bit in a weight, the graph or the metadata is refused -- and
remembers a verified file by path, size, modification and change time and inode.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import logging
import mmap
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from indis.engine.core.checkpoints import checkpoint_file

from .models import ExportSpec

log = logging.getLogger("indis.export")
MIN_OPSET = 19
EXTERNAL_DATA_BYTES = 512 << 20  # weights above this go to a side file (ONNX protobufs stop at 2 GiB)
CONTENT_KEY = "indis.content_sha256"
#: How the content hash's metadata entry is encoded (StringStringEntryProto: key = field 1, value = field 2,
#: 64 bytes), so its value can be found in the file's bytes without parsing the model.
_CONTENT_MARKER = b"\x0a" + bytes([len(CONTENT_KEY)]) + CONTENT_KEY.encode() + b"\x12\x40"
#: The encoded metadata key ``indis.name`` that every indis export carries (model metadata entries only:
#: a foreign graph may mention indis modules in node names or node metadata values).
_NAME_MARKER = b"\x0a\x0aindis.name\x12"
_UNSET = b"0" * 64
_verified: dict[str, tuple[int, ...]] = {}
_verified_lock = threading.Lock()


@dataclass(frozen=True)
class ExportResult:
    path: Path
    exporter: str                  # "dynamo" or "legacy"
    fallback_reason: str | None    # why the dynamo exporter was not used
    max_abs_error: float           # against torch on the verification inputs
    max_rel_error: float
    external_data: bool


def file_sha256(path: str | Path) -> str:
    """SHA-256 of an ONNX file and its external-data side files (the engine-cache key uses it)."""
    h = hashlib.sha256()
    for p in _side_files(Path(path)):
        with open(p, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def weights_sha256(module: torch.nn.Module) -> str:
    """Hash of a module's parameters and buffers (an export is stale when its weights change)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _side_files(path: Path) -> list[Path]:
    """The file and its external-data side file, if any (named literally: no glob, so ``[`` is safe)."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def _content_sha256(path: Path) -> tuple[str, int | None, bool]:
    """One pass over ``path`` and its external data: (hash with the content value read as zeros, byte
    offset of that value -- None unless it occurs exactly once --, whether the file has indis metadata)."""
    h = hashlib.sha256()
    offset, indis = None, False
    for i, p in enumerate(_side_files(path)):
        with open(p, "rb") as fh:
            if i == 0 and os.fstat(fh.fileno()).st_size:
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    at = mm.find(_CONTENT_MARKER)
                    indis = mm.find(_NAME_MARKER) >= 0  # an indis export: then it must be sealed
                    if at >= 0 and mm.find(_CONTENT_MARKER, at + 1) < 0:
                        offset = at + len(_CONTENT_MARKER)
                        h.update(memoryview(mm)[:offset])
                        h.update(_UNSET)
                        h.update(memoryview(mm)[offset + 64:])
                    else:
                        h.update(memoryview(mm))
                continue
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest(), offset, indis


def _stamp(path: Path) -> tuple[int, ...]:
    """What identifies a file's current bytes without reading them: size, mtime, ctime (which ``utime``
    cannot set back) and inode, for the file and its external data."""
    return tuple(v for p in _side_files(path) for st in [p.stat()]
                 for v in (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))


def verify_export(path: str | Path) -> None:
    """Refuse (``ValueError``) an exported file whose bytes do not match its ``indis.content_sha256``.

    One streaming pass over the file and its external data; a file verified before with the same sizes and
    modification and change times is not hashed again. A foreign ONNX file (no ``indis.name`` metadata
    entry) has nothing to verify.
    """
    path = checkpoint_file(path, "ONNX file")  # a FIFO would block the hash forever
    for side in _side_files(path)[1:]:
        checkpoint_file(side, "ONNX external data file")
    key, stamp = str(path.resolve()), _stamp(path)
    with _verified_lock:
        if _verified.get(key) == stamp:
            return
    digest, offset, indis = _content_sha256(path)
    if offset is None:
        if not indis:
            return
        raise ValueError(f"{path} has indis export metadata but no (single) content hash: it was exported by "
                         f"an older indis or edited; re-export it (indis export)")
    with open(path, "rb") as fh:
        fh.seek(offset)
        stored = fh.read(64)
    if stored != digest.encode():
        raise ValueError(f"{path} is corrupt: its bytes (weights, graph or metadata) do not match the "
                         f"content hash in its metadata; re-export it (indis export)")
    with _verified_lock:
        if len(_verified) >= 256:
            _verified.pop(next(iter(_verified)))
        _verified[key] = stamp


def _seal(path: Path) -> None:
    """Write the content hash into the placeholder an export left in ``path``'s metadata."""
    digest, offset, _ = _content_sha256(path)
    if offset is None:
        raise RuntimeError(f"{path}: the content hash placeholder was not found once in the saved file")
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(digest.encode())


def _cast(spec: ExportSpec, dtype: torch.dtype) -> tuple[torch.nn.Module, list]:
    module = copy.deepcopy(spec.module).to(dtype) if dtype != torch.float32 else spec.module
    inputs = [t.dtype if not t.dtype.is_floating_point else dtype for t in spec.inputs]
    return module, inputs


def export_onnx(spec: ExportSpec, path: str | Path, *, fp16: bool = False, opset: int = MIN_OPSET,
                external_data: bool | None = None, exporter: str = "auto",
                verify: bool = True) -> ExportResult:
    """Export ``spec`` to ``path`` (see the module docstring). ``exporter``: auto|dynamo|legacy."""
    import onnx

    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} < {MIN_OPSET}: per-sample sigma export needs opset >= {MIN_OPSET}")
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ValueError(f"exporter={exporter!r}: choose auto, dynamo or legacy")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if fp16 else torch.float32
    module, in_dtypes = _cast(spec, dtype)
    args = tuple(v.to(d) for v, d in zip(spec.sample_inputs(max(spec.batch_opt, 2)), in_dtypes, strict=True))
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
    tmp = path.with_name(path.name + ".tmp")
    reason = None
    used = "legacy"
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices
    if exporter in ("auto", "dynamo"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(tmp), dynamo=True, opset_version=opset,
                                  input_names=spec.input_names, output_names=spec.output_names,
                                  dynamic_shapes=spec.dynamic_shapes(),
                                  external_data=external, verbose=False)
            used = "dynamo"
        except Exception as e:  # noqa: BLE001 - any exporter failure falls back, with its reason logged
            if exporter == "dynamo":
                raise
            reason = _reason(e)
            log.warning("dynamo ONNX exporter failed for %s (%s); using the legacy exporter", spec.name,
                        reason)
    if used == "legacy":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(tmp), dynamo=False, opset_version=opset,
                              input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=spec.dynamic_axes())
    model = onnx.load(str(tmp), load_external_data=True)
    meta = {**spec.metadata, "indis.name": spec.name, "indis.batch_min": str(spec.batch_min),
            "indis.batch_opt": str(spec.batch_opt), "indis.batch_max": str(spec.batch_max),
            "indis.precision": "fp16" if fp16 else "fp32", "indis.exporter": used,
            "indis.weights_sha256": weights_sha256(spec.module), "indis.opset": str(opset),
            "indis.inputs": json.dumps([[t.name, list(t.shape), str(t.dtype)] for t in spec.inputs]),
            "indis.outputs": json.dumps([[t.name, list(t.shape), str(t.dtype)] for t in spec.outputs]),
            "indis.axes": json.dumps({a: list(size) for a, size in spec.axes.items()}),
            CONTENT_KEY: _UNSET.decode()}
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    for f in (path, path.with_name(path.name + ".data")):
        f.unlink(missing_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    for f in tmp.parent.glob(glob.escape(tmp.name) + "*"):
        f.unlink()
    _seal(path)
    onnx.checker.check_model(str(path))
    abs_err = rel_err = float("nan")
    if verify:
        abs_err, rel_err = verify_onnx(spec, path, fp16=fp16)
    return ExportResult(path, used, reason, abs_err, rel_err, external)


def verify_onnx(spec: ExportSpec, path: str | Path, *, fp16: bool = False,
                batches: tuple[int, ...] = (1, 3)) -> tuple[float, float]:
    """Max abs / max relative (to max |torch|) error of onnxruntime (CPU) against torch, over ``batches``
    (named dynamic axes at their opt size for the first batch, at their min size for the others)."""
    from .ort_backend import OrtModel

    dtype = torch.float16 if fp16 else torch.float32
    module, in_dtypes = _cast(spec, dtype)
    sess = OrtModel(path, providers=["CPUExecutionProvider"])
    worst_abs = worst_rel = 0.0
    for k, b in enumerate(batches):
        if not spec.batch_min <= b <= spec.batch_max:
            continue
        sizes = spec.sizes(1 if k == 0 else 0)
        args = [v.to(d) for v, d in zip(spec.sample_inputs(b, seed=b, sizes=sizes), in_dtypes, strict=True)]
        with torch.no_grad():
            ref = module(*args)
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        got = sess.run(dict(zip(spec.input_names, args, strict=True)))
        for r, o in zip(ref, got, strict=True):
            err = float((o.double() - r.double()).abs().max())
            worst_abs = max(worst_abs, err)
            worst_rel = max(worst_rel, err / max(float(r.double().abs().max()), 1e-30))
    return worst_abs, worst_rel


def is_current(spec: ExportSpec, path: str | Path, *, fp16: bool = False) -> bool:
    """Whether ``path`` is an intact export of this spec (content hash verified; same weights, batch range
    and precision)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        verify_export(path)
        meta = spec_from_onnx(path)
    except Exception:  # noqa: BLE001 - an unreadable file is simply not current
        return False
    want = {"indis.batch_min": str(spec.batch_min), "indis.batch_opt": str(spec.batch_opt),
            "indis.batch_max": str(spec.batch_max), "indis.precision": "fp16" if fp16 else "fp32",
            "indis.weights_sha256": weights_sha256(spec.module)}
    return all(meta.get(k) == v for k, v in want.items())


def spec_from_onnx(path: str | Path) -> dict[str, str]:
    """The indis metadata stored in an exported file (empty for a foreign ONNX file)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def _reason(e: BaseException) -> str:
    """The most informative line of an exporter error (torch.export chains the real cause)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:300]}"
