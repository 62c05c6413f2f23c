"""`indis export`: progress lines, verification numbers, up-to-date detection, force, TensorRT absent."""

from __future__ import annotations

from pathlib import Path

from indis.engine.cli import main
from indis.export.onnx_export import spec_from_onnx

HEAD = Path(__file__).parents[2] / "engine/weights/indis/digits-unet_ipndm_nfe3_phi.safetensors"


def test_export_cli(tmp_path: Path, capsys) -> None:
    args = ["export", "--predictor", str(HEAD), "--onnx-dir", str(tmp_path / "onnx"), "--batch-max", "8",
            "--engine-dir", str(tmp_path / "engines")]
    main(args)
    out = capsys.readouterr().out
    assert "TensorRT is not installed here" in out
    assert "[1/1] digits-unet_ipndm_nfe3_phi: done" in out and "max |err|" in out
    path = tmp_path / "onnx" / "digits-unet_ipndm_nfe3_phi.onnx"
    assert spec_from_onnx(path)["indis.batch_max"] == "8"
    main(args)
    assert "is up to date" in capsys.readouterr().out
    main([*args, "--force-export"])
    assert "exporting to" in capsys.readouterr().out
    main([*args[:-4], "--batch-max", "4"])  # another batch range: re-exported
    assert "exporting to" in capsys.readouterr().out
    assert spec_from_onnx(path)["indis.batch_max"] == "4"
