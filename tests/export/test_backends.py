"""onnxruntime runner and the TensorRT -> onnxruntime -> torch fallback chain: bad inputs and decisions."""

from __future__ import annotations

import logging

import pytest
import torch

import indis
from indis.export import ExportedDenoiser, ExportedPredictor, load_denoiser
from indis.export.ort_backend import OrtModel


def test_missing_and_corrupt_files(exported: dict, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="indis export"):
        OrtModel(tmp_path / "nope.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ValueError, match="could not be loaded"):
        OrtModel(garbage)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes((exported["dir"] / "unet.onnx").read_bytes()[:50_000])
    with pytest.raises(ValueError, match="corrupt"):
        OrtModel(truncated)


def test_batch_outside_the_exported_range(exported: dict) -> None:
    den = ExportedDenoiser(OrtModel(exported["dir"] / "unet.onnx"))
    with pytest.raises(ValueError, match=r"batch 17 is outside the range \[1, 16\] unet.onnx was exported"):
        den(torch.randn(17, 1, 8, 8), torch.ones(17))


def test_wrong_kind_and_inputs(exported: dict) -> None:
    with pytest.raises(ValueError, match="predictor"):
        ExportedPredictor(OrtModel(exported["dir"] / "unet.onnx"))
    with pytest.raises(ValueError, match="x and sigma"):
        ExportedDenoiser(OrtModel(exported["dir"] / "phi.onnx"))
    with pytest.raises(ValueError, match="takes inputs"):
        OrtModel(exported["dir"] / "dit.onnx").run({"x": torch.randn(2, 1, 8, 8), "sigma": torch.ones(2)})


def test_provider_fallback_is_detected_and_logged(exported: dict, caplog: pytest.LogCaptureFixture) -> None:
    """A provider this build lacks: the session runs on CPU, the fallback is logged, strict makes it fatal."""
    path = exported["dir"] / "unet.onnx"
    with caplog.at_level(logging.WARNING, logger="indis.export"):
        model = OrtModel(path, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert model.provider == "CPUExecutionProvider"
    assert model.fallback and "CUDAExecutionProvider" in model.fallback
    assert "fell back" in caplog.text
    with pytest.raises(RuntimeError, match="fell back"):
        OrtModel(path, ["CUDAExecutionProvider", "CPUExecutionProvider"], strict=True)


def test_fallback_chain_decisions(exported: dict, tmp_path) -> None:
    unet = exported["unet"]
    model, choice = load_denoiser(unet, onnx_path=exported["dir"] / "unet.onnx")
    assert choice.backend == "onnxruntime" and choice.provider == "CPUExecutionProvider"
    assert isinstance(model, ExportedDenoiser)
    model, choice = load_denoiser(unet, onnx_path=tmp_path / "missing.onnx")    # auto: ORT fails -> torch
    assert model is unet and choice.backend == "torch"
    assert "onnxruntime: FileNotFoundError" in choice.reasons[0]
    with pytest.raises(RuntimeError, match="CUDA device"):                     # explicit: no silent switch
        load_denoiser(unet, onnx_path=exported["dir"] / "unet.onnx", backend="tensorrt")
    with pytest.raises(RuntimeError, match="no backend could run"):
        load_denoiser(None, onnx_path=tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="backend"):
        load_denoiser(unet, backend="openvino")
    _, choice = load_denoiser(unet, onnx_path=exported["dir"] / "unet.onnx",
                              providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert any("fell back" in r for r in choice.reasons)  # the provider fallback is part of the choice


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_continuous_batcher_serves_exported_models(exported: dict, kind: str) -> None:
    """The production path: the exported denoiser (and INDIS predictor) behind the continuous batcher, with
    buckets inside the exported batch range, serves the same samples as the torch models."""
    from indis.engine.serving.batcher import ContinuousBatcher, Request

    conditions = {"class_labels": (-1, 10)} if kind == "dit" else None
    reqs = [Request(seed=i, nfe=(3, 5, 7)[i % 3], schedule="edm",
                    cond={"class_labels": i % 10} if kind == "dit" else {}) for i in range(20)]
    if kind == "unet":  # requests on the shipped NFE-5 INDIS head, run by the exported predictor
        reqs += [Request(seed=100 + i, nfe=5, schedule="predictor") for i in range(6)]
    outs = {}
    for name, den, phi in (
            ("torch", exported[kind], exported["phi"]),
            ("onnxruntime", ExportedDenoiser(OrtModel(exported["dir"] / f"{kind}.onnx")),
             ExportedPredictor(OrtModel(exported["dir"] / "phi.onnx")))):
        batcher = ContinuousBatcher(den, (1, 8, 8), capacity=16, buckets=(4, 8, 16),
                                    predictors={(5, "ipndm"): phi}, conditions=conditions)
        with torch.no_grad():
            outs[name] = torch.stack(batcher.run_all(reqs))
    assert outs["torch"].abs().max() > 0.5  # real samples, not zeros
    torch.testing.assert_close(outs["onnxruntime"], outs["torch"], atol=1e-4, rtol=1e-4)


def test_a_predictor_exported_under_the_old_scale_definition_is_refused(exported: dict) -> None:
    runner = OrtModel(exported["dir"] / "phi.onnx")
    assert runner.metadata["format"] == indis.engine.core.predictor.FORMAT
    ExportedPredictor(runner)
    for old in ({k: v for k, v in runner.metadata.items() if k != "format"},
                {**runner.metadata, "format": "indis-predictor/1"}):
        runner.metadata = old
        with pytest.raises(ValueError, match="denoised x0"):
            ExportedPredictor(runner)


def test_bound_outputs_are_sized_by_the_graph_not_by_metadata(exported: dict) -> None:
    from indis.export.ort_backend import _bindable

    runner = OrtModel(exported["dir"] / "unet.onnx")
    assert runner._out_shapes == {"denoised": [None, 1, 8, 8]}  # the graph's declared shape, batch symbolic
    assert _bindable(["batch", 3, 4]) == [None, 3, 4] and _bindable(["batch", "h", 4]) is None
    assert _bindable([2, 3]) == [2, 3] and _bindable([]) is None
