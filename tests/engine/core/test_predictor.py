"""INDIS predictor: init reproduces the heuristic, monotone grids for any logits, the schedule it hands to
``sample``, its input errors and its checkpoint format."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import indis
from indis.engine.core.predictor import (
    FORMAT,
    HEURISTICS,
    Predictor,
    PredictorConfig,
    ScheduleConfig,
)
from tests.helpers import gaussian_denoiser


@pytest.mark.parametrize("init", HEURISTICS)
@pytest.mark.parametrize("space", ["lambda", "t", "sigma"])
@pytest.mark.parametrize("final_zero", [False, True])
def test_init_reproduces_heuristic(init: str, space: str, final_zero: bool) -> None:
    sc = ScheduleConfig(nfe=5, sigma_min=0.002, sigma_max=80.0, init=init, space=space, final_zero=final_zero)
    for head in (Predictor(PredictorConfig(sc, "ipndm", (1, 8, 8), pool=4)),
                 Predictor(PredictorConfig(sc, "ipndm", (1, 8, 8), num_classes=10)),
                 Predictor(PredictorConfig(sc, "ipndm", (1, 8, 8), blind=True))):
        x = torch.randn(3, 1, 8, 8) * 80
        s = head(x, torch.tensor([0, 3, 9]) if head.config.num_classes else None)
        ref = sc.init_grid()
        torch.testing.assert_close(s.grid, ref.expand(3, -1), rtol=1e-12, atol=0)
        assert (s.grid[:, 0] == 80.0).all() and (s.grid[:, -1] == ref[-1]).all()
        assert (s.shift == 0).all() and (s.scale == 1).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-60, 60), min_size=10, max_size=10), st.sampled_from(["lambda", "t", "sigma"]),
       st.sampled_from(["ve", "vp_linear", "flow"]))
def test_grid_monotone_with_exact_endpoints_for_any_logits(logits, space, family) -> None:
    smax = 60.0 if family != "flow" else 200.0
    sc = ScheduleConfig(nfe=3, sigma_min=0.01, sigma_max=smax, family=family, space=space, shift_bound=0.2,
                        scale_bound=0.1)
    s = sc.decode(torch.tensor([logits], dtype=torch.float64))
    assert s.grid[0, 0] == smax and s.grid[0, -1] == 0.01
    assert (torch.diff(s.grid, dim=-1) < 0).all()
    assert (s.shift.abs() <= 0.2 + 1e-12).all() and ((s.scale - 1).abs() <= 0.1 + 1e-12).all()


def test_schedule_goes_straight_into_sample() -> None:
    sc = ScheduleConfig(nfe=4, sigma_min=0.002, sigma_max=80.0)
    head = Predictor(PredictorConfig(sc, "dpmpp_2m", (4,)))
    with torch.no_grad():
        head.out.weight.normal_(0, 0.5)
    x = torch.randn(5, 4, dtype=torch.float64) * 80
    s = head(x).detach()
    assert not torch.equal(s.grid[0], s.grid[1])  # instance-aware once trained
    out = indis.sample(gaussian_denoiser, x, s, "dpmpp_2m")
    ref = indis.sample(gaussian_denoiser, x, s.grid, "dpmpp_2m", shift=s.shift, scale=s.scale)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="Schedule"):
        indis.sample(gaussian_denoiser, x, s, "dpmpp_2m", shift=s.shift)


def test_predictor_input_errors() -> None:
    sc = ScheduleConfig(nfe=3, sigma_min=0.002, sigma_max=80.0)
    head = Predictor(PredictorConfig(sc, "euler", (1, 8, 8), num_classes=10))
    with pytest.raises(ValueError, match="sample shape"):
        head(torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="conditional"):
        head(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="solver"):
        PredictorConfig(sc, "rk4", (2,))
    with pytest.raises(ValueError, match="init"):
        ScheduleConfig(nfe=3, sigma_min=0.002, sigma_max=80.0, init="cosine")


def test_checkpoint_roundtrip_mismatch_and_corruption(tmp_path) -> None:
    sc = ScheduleConfig(nfe=3, sigma_min=0.002, sigma_max=80.0, shift_bound=0.2)
    head = Predictor(PredictorConfig(sc, "ipndm", (1, 8, 8), pool=2, backbone="digits-unet"))
    with torch.no_grad():
        head.out.weight.normal_()
    path = head.save(tmp_path / "phi.safetensors", note="test")
    loaded = Predictor.load(path, nfe=3, solver="ipndm", backbone="digits-unet")
    x = torch.randn(4, 1, 8, 8) * 80
    assert torch.equal(loaded(x).grid, head(x).grid) and loaded.metadata == {"note": "test"}
    with pytest.raises(ValueError, match="NFE=5"):
        Predictor.load(path, nfe=5)
    with pytest.raises(ValueError, match="solver='euler'"):
        Predictor.load(path, solver="euler")
    with pytest.raises(FileNotFoundError):
        Predictor.load(tmp_path / "missing.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits in the tensor data
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt"):
        Predictor.load(tmp_path / "flipped.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="not a readable"):
        Predictor.load(tmp_path / "truncated.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"indis": json.dumps({})})
    with pytest.raises(ValueError, match="no valid indis predictor metadata"):
        Predictor.load(tmp_path / "other.safetensors")


def test_raw_from_grid_decodes_to_that_grid() -> None:
    sc = ScheduleConfig(nfe=3, sigma_min=0.002, sigma_max=80.0)
    grid = torch.tensor([80.0, 1.584, 0.5666, 0.002], dtype=torch.float64)
    s = sc.decode(sc.raw_from_grid(grid).unsqueeze(0))
    torch.testing.assert_close(s.grid[0], grid, rtol=1e-12, atol=0)
    assert (s.shift == 0).all() and (s.scale == 1).all()
    with pytest.raises(ValueError, match="shape"):
        sc.raw_from_grid(grid[:3])


def test_checkpoints_of_the_old_scale_definition_are_refused(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    head = Predictor(PredictorConfig(ScheduleConfig(nfe=3, sigma_min=0.002, sigma_max=80.0), "euler", (4,)))
    path = head.save(tmp_path / "phi.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["indis"])
    assert meta["format"] == FORMAT
    meta["format"] = "indis-predictor/1"
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata={"indis": json.dumps(meta)})
    with pytest.raises(ValueError, match="denoised x0.*re-tune"):
        Predictor.load(tmp_path / "old.safetensors")
    meta["format"] = "something-else/9"
    save_file(load_file(str(path)), str(tmp_path / "odd.safetensors"), metadata={"indis": json.dumps(meta)})
    with pytest.raises(ValueError, match=f"expected '{FORMAT}'"):
        Predictor.load(tmp_path / "odd.safetensors")
    meta["format"] = "indis-predictor/2"
    save_file(load_file(str(path)), str(tmp_path / "v2.safetensors"), metadata={"indis": json.dumps(meta)})
    with pytest.raises(ValueError, match="checksum covered only its tensors"):
        Predictor.load(tmp_path / "v2.safetensors")
