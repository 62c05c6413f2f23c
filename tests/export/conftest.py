"""Exported digits UNet, DiT and a shipped INDIS predictor, shared by the export tests (exported once)."""

from __future__ import annotations

from pathlib import Path

import pytest

import indis
from indis.engine.testbeds.digits import load_backbone
from indis.export import denoiser_spec, export_onnx, predictor_spec

HEAD = Path(__file__).parents[2] / "engine/weights/indis/digits-unet_ipndm_nfe5_phi.safetensors"


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("onnx")
    unet, dit = load_backbone("unet"), load_backbone("dit")
    phi = indis.Predictor.load(HEAD)
    specs = {"unet": denoiser_spec(unet, (1, 8, 8), name="unet", input_std=5.0, batch_max=16),
             "dit": denoiser_spec(dit, (1, 8, 8), name="dit", cond={"class_labels": 10}, input_std=5.0,
                                  batch_max=16),
             "phi": predictor_spec(phi, batch_max=16)}
    results = {k: export_onnx(s, out / f"{k}.onnx", verify=False) for k, s in specs.items()}
    return {"dir": out, "specs": specs, "results": results, "unet": unet, "dit": dit, "phi": phi}
