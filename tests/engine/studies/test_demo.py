"""The README's main command: the INDIS demo on the digits UNet (and, with ``--testbed``, the Fashion-MNIST
UNet), with shipped heads and with heads tuned on the spot."""

from __future__ import annotations

from pathlib import Path

import pytest

from indis.engine.studies import demo
from indis.engine.studies.quality import TESTBEDS, load_heads
from indis.engine.testbeds.digits import SHIPPED_HEADS


def _run(tmp_path: Path, *extra: str, testbed: str = "digits-unet") -> str:
    out = tmp_path / "out"
    cache = str(tmp_path / "cache")
    demo.main(["--samples", "16", "--nfe", "3", "--out", str(out), "--cache", cache, "--testbed", testbed,
               *extra])
    text = (out / "quality.md").read_text()
    assert f"| {testbed} | 3 | 16 |" in text
    for method in ("heuristic edm", "LD3-global", "phi blind (ablation)", "INDIS phi"):
        assert f"| {method} |" in text
    return text


def test_demo_with_shipped_heads(tmp_path: Path) -> None:
    if load_heads(SHIPPED_HEADS, TESTBEDS["digits-unet"](), 3) is None:
        pytest.fail(f"no shipped NFE-3 heads under {SHIPPED_HEADS}: "
                    "run python -m indis.engine.studies.quality --ship engine/weights/indis")
    _run(tmp_path)


def test_demo_on_the_fashion_backbone_with_shipped_heads(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from indis.engine.testbeds import fashion

    if not fashion.available():
        pytest.skip(f"Fashion-MNIST is not installed ({fashion.DEBIAN_PACKAGE}): no FD reference")
    if load_heads(SHIPPED_HEADS, TESTBEDS["fashion-unet"](), 3) is None:
        pytest.fail(f"no shipped fashion-unet NFE-3 heads under {SHIPPED_HEADS}")
    text = _run(tmp_path, testbed="fashion-unet")
    assert "GITS (dynamic programming)" in text and "phi's mean schedule (global)" in text
    out = capsys.readouterr().out
    assert "INDIS demo: fashion-unet" in out and "NFE 3: INDIS phi" in out and "no shipped heads" not in out


def test_demo_tunes_missing_heads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path, "--heads", str(tmp_path / "none"), "--fit-steps", "2")
    assert "no shipped heads" in capsys.readouterr().out


def test_verdict_says_plainly_which_schedule_wins() -> None:
    rows = {"GITS (dynamic programming)": {"mse": 0.02, "kind": "global"},
            "heuristic edm": {"mse": 0.05, "kind": "global"},
            "INDIS phi": {"mse": 0.015, "kind": "indis"},
            "INDIS phi, no shift/scale": {"mse": 0.001, "kind": "ablation"}}
    won = demo.verdict({"nfe": 3, "rows": rows})
    assert "INDIS phi WINS" in won and "-25.0 %" in won and "(GITS (dynamic programming), 0.02)" in won
    assert won.index("GITS") < won.index("heuristic edm")  # global schedules ranked, best first
    assert "against the published tuned schedules: GITS (dynamic programming) -25.0 %" in won
    rows["INDIS phi"]["fd_data"], rows["GITS (dynamic programming)"]["fd_data"] = 7.25, 7.5
    assert "(FD to data 7.25 vs GITS 7.5)" in demo.verdict({"nfe": 3, "rows": rows})
    rows["INDIS phi"]["mse"] = 0.03
    assert "INDIS phi LOSES: teacher MSE 0.03, +50.0 %" in demo.verdict({"nfe": 5, "rows": rows})
    rows["GITS (dynamic programming)"]["se_vs_phi"] = 0.006  # a 0.01 gap within 2 paired s.e. is a tie
    assert "INDIS phi TIES (within 2 paired s.e.): teacher MSE 0.03, +50.0 % ± 30 %" in demo.verdict(
        {"nfe": 5, "rows": rows})
    rows["GITS (dynamic programming)"]["se_vs_phi"] = 0.004
    assert "INDIS phi LOSES: teacher MSE 0.03, +50.0 % ± 20 %" in demo.verdict({"nfe": 5, "rows": rows})
