"""The tiny random diffusers models and pipeline (``engine/testbeds/tiny_diffusers.py``) and the diffusers
example built on them (``benchmarks/example_diffusers.py``)."""

from __future__ import annotations

import re

import pytest
import torch

from indis.engine.testbeds.tiny_diffusers import TEXT, text_unet, tiny_sd_pipe

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


def test_the_tiny_models_are_deterministic_and_text_conditioned() -> None:
    a, b = text_unet(sample_size=16), text_unet(sample_size=16)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    text = torch.randn(2, 5, 12)
    with torch.no_grad():
        out = a(x, t, **{TEXT: text}).sample
        torch.testing.assert_close(out, b(x, t, **{TEXT: text}).sample)
        assert not torch.allclose(out, a(x, t, **{TEXT: text.flip(0)}).sample)
    pipe = tiny_sd_pipe()
    images = pipe(["a cat"], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_the_diffusers_example_runs_and_agrees_with_the_pipe(capsys, tmp_path) -> None:
    from benchmarks.example_diffusers import main

    main(["--steps", "4", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    errors = [float(v) for v in re.findall(r":\s+([0-9.]+e[-+][0-9]+)", printed)]
    assert len(errors) == 3 and max(errors) <= 1e-5, printed
    assert (tmp_path / "images.png").stat().st_size > 0
    assert "indis.sample" in (tmp_path / "example.md").read_text()
