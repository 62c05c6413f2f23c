"""TensorRT backend: everything that needs no TensorRT (cache keys, profiles, precision rules). The engine
build and run are unverified on hardware (TensorRT cannot be installed on the project's machines)."""

from __future__ import annotations

import pytest

from indis.export.onnx_export import spec_from_onnx
from indis.export.tensorrt_backend import check_precision, engine_cache_key, profile_from_metadata


def test_profile_from_the_export_metadata(exported: dict) -> None:
    meta = spec_from_onnx(exported["dir"] / "dit.onnx")
    prof = profile_from_metadata(meta)
    assert prof == {"x": ((1, 1, 8, 8), (8, 1, 8, 8), (16, 1, 8, 8)), "sigma": ((1,), (8,), (16,)),
                    "class_labels": ((1,), (8,), (16,))}  # sigma follows the batch axis
    assert profile_from_metadata(meta, 2, 4, 8)["sigma"] == ((2,), (4,), (8,))
    with pytest.raises(ValueError, match="within the exported range"):
        profile_from_metadata(meta, 1, 8, 32)
    with pytest.raises(ValueError, match="no indis export metadata"):
        profile_from_metadata({})


def test_engine_cache_key_covers_every_input() -> None:
    prof = {"x": ((1, 4), (8, 4), (16, 4))}
    base = engine_cache_key("abc", "10.7", "H100 sm_90", prof, "fp16", 3)
    assert base == engine_cache_key("abc", "10.7", "H100 sm_90", dict(prof), "fp16", 3)
    gpu, wider = "H100 sm_90", {"x": ((1, 4), (8, 4), (32, 4))}
    variants = [("abd", "10.7", gpu, prof, "fp16", 3), ("abc", "10.8", gpu, prof, "fp16", 3),
                ("abc", "10.7", "H200 sm_90", prof, "fp16", 3), ("abc", "10.7", gpu, wider, "fp16", 3),
                ("abc", "10.7", gpu, prof, "fp32", 3), ("abc", "10.7", gpu, prof, "fp16", 5)]
    keys = {engine_cache_key(*v) for v in variants}
    assert len(keys) == len(variants) and base not in keys
    with pytest.raises(ValueError, match="precision"):
        engine_cache_key("abc", "10.7", "H100", prof, "int8", 3)


def test_strongly_typed_precision_must_match_the_onnx_file() -> None:
    check_precision("fp32", {"indis.precision": "fp32"})
    check_precision("fp16", {"indis.precision": "fp16"})
    with pytest.raises(ValueError, match="re-export with --fp16"):
        check_precision("fp16", {"indis.precision": "fp32"})
