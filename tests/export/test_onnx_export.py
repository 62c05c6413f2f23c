"""ONNX export: per-sample sigma on the batch axis, onnxruntime == torch at batch 1/3/8, whole INDIS runs,
precision and external-data variants, the legacy-exporter fallback, and refusal of unfit models."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx
import pytest
import torch

import indis
from indis.export import ExportedDenoiser, ExportedPredictor, denoiser_spec, export_onnx, is_current
from indis.export import predictor_spec as indis_predictor_spec
from indis.export.onnx_export import spec_from_onnx, verify_export
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


# ----------------------------------------------------------------------------------------------- integrity
def _copy(exported: dict, tmp_path, name: str = "unet") -> Path:
    import shutil

    dst = tmp_path / f"{name}.onnx"
    shutil.copy(exported["dir"] / f"{name}.onnx", dst)
    return dst


def _poke(path, at: float, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    i = int(len(raw) * at)
    raw[i:i + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["one flipped bit", "64 overwritten bytes", "metadata edit"])
def test_a_damaged_export_is_refused_by_every_backend(exported: dict, tmp_path, damage: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from indis.export import load_denoiser

    path = _copy(exported, tmp_path)
    verify_export(path)
    if damage == "one flipped bit":
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
    elif damage == "64 overwritten bytes":
        _poke(path, 0.6, b"\xff" * 64)
    else:
        raw = path.read_bytes()
        assert raw.count(b'"batch_max": ') <= 1 and b"indis.batch_max" in raw
        path.write_bytes(raw.replace(b"indis.batch_max\x12\x0216", b"indis.batch_max\x12\x0299"))
        assert path.read_bytes() != raw
    with pytest.raises(ValueError, match="corrupt"):
        OrtModel(path)
    with pytest.raises(ValueError, match="corrupt"):
        load_denoiser(exported["unet"], onnx_path=path, backend="onnxruntime")
    with caplog.at_level(logging.WARNING, logger="indis.export"):
        model, choice = load_denoiser(exported["unet"], onnx_path=path)  # auto: a logged fall-back to torch
    assert model is exported["unet"] and choice.backend == "torch"
    assert any("corrupt" in r for r in choice.reasons) and "corrupt" in caplog.text


def test_external_data_is_covered_and_verification_is_cached_by_size_and_mtime(
        exported: dict, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from indis.export import onnx_export

    path = tmp_path / "ext" / "unet.onnx"
    export_onnx(exported["specs"]["unet"], path, external_data=True, verify=False)
    data = path.with_name("unet.onnx.data")
    calls = []
    real = onnx_export._content_sha256
    monkeypatch.setattr(onnx_export, "_content_sha256", lambda p: calls.append(p) or real(p))
    verify_export(path)
    verify_export(path)
    assert len(calls) == 1  # the second call found the file unchanged
    stat = data.stat()
    _poke(data, 0.5, b"\x00\x01\x02\x03")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, mtime set back: ctime still moved
    with pytest.raises(ValueError, match="corrupt"):
        verify_export(path)
    assert len(calls) == 2


def test_names_with_glob_characters_keep_their_external_data_covered(exported: dict, tmp_path) -> None:
    path = tmp_path / "unet[v2].onnx"
    export_onnx(exported["specs"]["unet"], path, external_data=True, verify=False)
    verify_export(path)
    _poke(path.with_name(path.name + ".data"), 0.5, b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="corrupt"):
        verify_export(path)


def test_a_corrupt_export_is_not_current_and_a_fifo_is_refused(exported: dict, tmp_path) -> None:
    import os

    spec = exported["specs"]["unet"]
    path = tmp_path / "unet.onnx"
    export_onnx(spec, path, verify=False)
    assert is_current(spec, path)
    _poke(path, 0.6, b"\xff" * 8)
    assert not is_current(spec, path)  # so `indis export` writes it again instead of calling it up to date
    os.mkfifo(tmp_path / "pipe.onnx")
    with pytest.raises(ValueError, match="not a regular file"):
        verify_export(tmp_path / "pipe.onnx")
    os.mkfifo(tmp_path / "unet.onnx.data")  # an external-data side file that would block the hash
    with pytest.raises(ValueError, match="external data file .* not a regular file"):
        verify_export(path)


def test_foreign_files_have_nothing_to_verify_and_an_unsealed_export_is_refused(exported: dict,
                                                                                 tmp_path) -> None:
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"], doc_string="m: indis.engine.digits.DigitsUNet")
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    foreign = tmp_path / "foreign.onnx"
    # a pinned IR version and opset: helper.make_model's defaults can be newer than the onnxruntime beside it
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(foreign))
    verify_export(foreign)
    assert OrtModel(foreign).run({"x": torch.tensor([-1.0, 2.0])})[0].tolist() == [0.0, 2.0]
    path = _copy(exported, tmp_path)
    path.write_bytes(path.read_bytes().replace(b"indis.content_sha256", b"indis.content_sha25X"))
    with pytest.raises(ValueError, match="no \\(single\\) content hash"):
        OrtModel(path)


def test_a_text_unet_with_guidance_and_a_text_conditioned_phi_run_in_onnxruntime(tmp_path) -> None:
    """A diffusers UNet2DConditionModel (through from_diffusers: the VP time map and ``timestep [B]`` in the
    graph) with ``encoder_hidden_states [B, seq, 12]`` on a dynamic sequence axis, and phi conditioned on the
    pooled text embedding: CFG 7.5 with phi's per-sample schedules, all in onnxruntime, equals torch; the
    TensorRT profile covers the sequence axis."""
    diffusers = pytest.importorskip("diffusers")
    from indis.engine.testbeds.tiny_diffusers import TEXT, text_unet
    from indis.export.tensorrt_backend import profile_from_metadata

    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                  beta_end=0.012)
    den = indis.from_diffusers(text_unet(sample_size=16), sched)
    spec = denoiser_spec(den, (4, 16, 16), name="text-unet", cond={TEXT: ("seq", 12)},
                         axes={"seq": (1, 5, 8)}, batch_opt=4, batch_max=8)
    result = export_onnx(spec, tmp_path / "unet.onnx")
    assert result.max_rel_error <= 1e-4, result
    sc = indis.ScheduleConfig(nfe=4, sigma_min=0.05, sigma_max=14.0, family="vp_linear")
    phi = indis.Predictor(indis.PredictorConfig(sc, "dpmpp_2m", (4, 16, 16), cond_dim=12, pool=4))
    torch.nn.init.normal_(phi.out.weight, std=0.05)
    assert export_onnx(indis_predictor_spec(phi), tmp_path / "phi.onnx").max_rel_error <= 1e-4
    ort_unet = ExportedDenoiser(OrtModel(tmp_path / "unet.onnx"))
    ort_phi = ExportedPredictor(OrtModel(tmp_path / "phi.onnx"))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 16, 16, generator=g) * float(den.family.s(torch.tensor(14.0)))
    text = torch.randn(3, 7, 12, generator=g)  # sequence length 7: not the export's
    for rescale, prediction in ((0.0, "x0"), (0.7, den.prediction)):  # rescale acts on the prediction
        cfg = dict(cond={TEXT: text}, uncond={TEXT: torch.zeros(1, 7, 12)}, guidance_scale=7.5,
                   guidance_rescale=rescale)
        with torch.no_grad():
            ref = indis.sample(den, x, phi(x, text.mean(1)), "dpmpp_2m", **cfg)
            got = indis.sample(ort_unet.in_family(den.family, prediction), x, ort_phi(x, text.mean(1)),
                               "dpmpp_2m", **cfg)
        abs_err, rel_err = _max_errors(got, ref)
        print(f"text UNet + phi, CFG (rescale {rescale}), onnxruntime: max abs error {abs_err:.2e}, "
              f"relative {rel_err:.2e}")
        assert rel_err <= 1e-4
    prof = profile_from_metadata(spec_from_onnx(tmp_path / "unet.onnx"))
    assert prof[TEXT] == ((1, 1, 12), (4, 5, 12), (8, 8, 12)) and prof["sigma"] == ((1,), (4,), (8,))


def test_an_sd3_shaped_transformer_exports_with_text_and_pooled_inputs(tmp_path) -> None:
    """A tiny diffusers SD3Transformer2DModel under FlowMatch (shift 3): text ``[B, seq, 12]`` and pooled
    ``[B, 6]`` inputs, per-sample sigma; onnxruntime equals torch at batch 1 and 3 and two sequence
    lengths."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    net = diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6,
        pos_embed_max_size=16).eval()
    den = indis.from_diffusers(net, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    cond = {"encoder_hidden_states": ("seq", 12), "pooled_projections": (6,)}
    spec = denoiser_spec(den, (4, 16, 16), name="sd3", cond=cond, axes={"seq": (1, 5, 8)}, batch_opt=4,
                         batch_max=8)
    export_onnx(spec, tmp_path / "sd3.onnx", verify=False)
    ort = ExportedDenoiser(OrtModel(tmp_path / "sd3.onnx"))
    g = torch.Generator().manual_seed(6)
    for b, seq in ((1, 5), (3, 2)):
        x, sigma = torch.randn(b, 4, 16, 16, generator=g), torch.exp(torch.randn(b, generator=g))
        c = {"encoder_hidden_states": torch.randn(b, seq, 12, generator=g),
             "pooled_projections": torch.randn(b, 6, generator=g)}
        with torch.no_grad():
            ref = den(x, sigma, **c)
        abs_err, rel_err = _max_errors(ort(x, sigma, **c), ref)
        print(f"SD3-shaped transformer batch {b}, seq {seq}: max abs error {abs_err:.2e}, "
              f"relative {rel_err:.2e}")
        assert rel_err <= 1e-4


def test_a_discrete_vp_denoiser_exports_and_still_runs_eagerly(tmp_path) -> None:
    """A discrete-VP denoiser (diffusers' timestep input) exports and verifies with an empty knot cache, and
    afterwards still computes real tensors: the export's fake tensors are never kept in the family's
    per-device cache."""
    from indis.engine.core.families import Denoiser, VPDiscrete

    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return x * torch.cos(t / 1000).view(-1, 1)

    den = Denoiser(Net(), VPDiscrete.from_config(), "eps", "t")
    x, sigma = torch.randn(3, 4), torch.tensor([0.5, 2.0, 9.0])
    want = Denoiser(Net(), VPDiscrete.from_config(), "eps", "t")(x, sigma)
    result = export_onnx(denoiser_spec(den, (4,), check=False), tmp_path / "vp.onnx")
    assert result.max_abs_error < 1e-4
    got = den(x, sigma)
    assert type(got) is torch.Tensor
    torch.testing.assert_close(got, want)
