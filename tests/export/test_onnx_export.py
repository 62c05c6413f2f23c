"""ONNX export: per-sample sigma on the batch axis, onnxruntime == torch at batch 1/3/8, whole INDIS runs,
precision and external-data variants, the legacy-exporter fallback, and refusal of unfit models."""

from __future__ import annotations

import dataclasses

import onnx
import pytest
import torch

import indis
from indis.export import ExportedDenoiser, ExportedPredictor, denoiser_spec, export_onnx, is_current
from indis.export.onnx_export import spec_from_onnx
from indis.export.ort_backend import OrtModel


def _max_errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    err = float((got.double() - ref.double()).abs().max())
    return err, err / float(ref.double().abs().max())


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_denoisers_match_torch_with_per_sample_sigmas(exported: dict, name: str) -> None:
    model = exported[name]
    ort_model = ExportedDenoiser(OrtModel(exported["dir"] / f"{name}.onnx"))
    g = torch.Generator().manual_seed(1)
    for b in (1, 3, 8):
        x = torch.randn(b, 1, 8, 8, generator=g) * 5
        sigma = torch.exp(torch.empty(b).uniform_(-4, 4, generator=g))   # a different sigma per sample
        cond = {"class_labels": torch.randint(0, 10, (b,), generator=g)} if name == "dit" else {}
        with torch.no_grad():
            ref = model(x, sigma, **cond)
        abs_err, rel_err = _max_errors(ort_model(x, sigma, **cond), ref)
        print(f"{name} batch {b}: max abs error {abs_err:.2e}, relative {rel_err:.2e}")
        assert rel_err <= 1e-4, (b, abs_err)
        if b > 1:  # sigma really is per sample: one shared sigma gives another answer
            shared = ort_model(x, sigma[:1].expand(b), **cond)
            assert not torch.allclose(shared[1:], ref[1:], atol=1e-3)


def test_predictor_matches_torch(exported: dict) -> None:
    phi, ort_phi = exported["phi"], ExportedPredictor(OrtModel(exported["dir"] / "phi.onnx"))
    for b in (1, 3, 8):
        x = torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(b)) * 80
        with torch.no_grad():
            ref = phi(x)
        got = ort_phi(x)
        for name in ("grid", "shift", "scale"):
            abs_err, rel_err = _max_errors(getattr(got, name), getattr(ref, name))
            print(f"predictor {name} batch {b}: max abs error {abs_err:.2e}, relative {rel_err:.2e}")
            assert rel_err <= 1e-4


def test_whole_indis_run_with_onnxruntime_matches_torch(exported: dict) -> None:
    """predictor -> per-sample schedule -> 5-step iPNDM with the UNet, all in onnxruntime, vs all torch."""
    unet, phi = exported["unet"], exported["phi"]
    ort_unet = ExportedDenoiser(OrtModel(exported["dir"] / "unet.onnx"))
    ort_phi = ExportedPredictor(OrtModel(exported["dir"] / "phi.onnx"))
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 80
    with torch.no_grad():
        ref = indis.sample(unet, x, phi(x), "ipndm")
    got = indis.sample(ort_unet, x, ort_phi(x), "ipndm")
    abs_err, rel_err = _max_errors(got, ref)
    print(f"whole INDIS run: max abs error {abs_err:.2e}, relative {rel_err:.2e}")
    assert rel_err <= 1e-4


def test_export_metadata_and_currency(exported: dict) -> None:
    path, spec = exported["dir"] / "unet.onnx", exported["specs"]["unet"]
    meta = spec_from_onnx(path)
    assert meta["indis.exporter"] == "dynamo" and meta["kind"] == "denoiser"
    assert meta["indis.batch_max"] == "16"
    graph = onnx.load(str(path)).graph
    batch_dims = [i.type.tensor_type.shape.dim[0].dim_param for i in graph.input]
    assert batch_dims[0] and len(set(batch_dims)) == 1  # x and sigma share the symbolic batch axis
    assert [d.dim_param or d.dim_value for d in graph.input[1].type.tensor_type.shape.dim] == [batch_dims[0]]
    assert is_current(spec, path)
    assert not is_current(dataclasses.replace(spec, batch_max=32), path)
    assert not is_current(spec, path, fp16=True)


def test_fp16_external_data_and_legacy_exporter(exported: dict, tmp_path) -> None:
    spec = exported["specs"]["unet"]
    r16 = export_onnx(spec, tmp_path / "unet16.onnx", fp16=True)
    inits = onnx.load(str(r16.path)).graph.initializer
    floats = [list(t.dims) for t in inits if t.data_type == onnx.TensorProto.FLOAT]
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in inits)
    assert all(d == [4] for d in floats), floats  # only Resize's scales, which ONNX requires in float32
    assert r16.max_rel_error <= 2e-3  # onnxruntime fp16 vs torch fp16 (CPU)
    ext = export_onnx(spec, tmp_path / "ext" / "unet.onnx", external_data=True)
    assert ext.external_data and (tmp_path / "ext" / "unet.onnx.data").stat().st_size > 1_000_000
    assert ext.max_rel_error <= 1e-4
    legacy = export_onnx(spec, tmp_path / "legacy.onnx", exporter="legacy")
    assert legacy.exporter == "legacy" and legacy.max_rel_error <= 1e-4
    with pytest.raises(ValueError, match="opset"):
        export_onnx(spec, tmp_path / "old.onnx", opset=17)


class _ScalarSigma(torch.nn.Module):
    """Uses the first sigma for the whole batch (the TensorRT demo's [1] timestep)."""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x / (1 + sigma[0] ** 2)


class _NoSigma(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5


class _IgnoresSigma(torch.nn.Module):
    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x * 0.5


@pytest.mark.parametrize(("model", "match"), [(_ScalarSigma(), "first element"),
                                              (_NoSigma(), "does not take a per-sample sigma"),
                                              (_IgnoresSigma(), "ignores sigma")])
def test_models_without_per_sample_sigma_are_refused(model: torch.nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        denoiser_spec(model, (4,))
