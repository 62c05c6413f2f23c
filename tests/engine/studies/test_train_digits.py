"""The digits training command (``python -m indis.engine.studies.train_digits``)."""

from __future__ import annotations

import json

import pytest

from indis.engine.studies import train_digits
from indis.engine.testbeds import digits as d


def test_cli_trains_classifier(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    train_digits.main(["train", "--which", "classifier", "--steps", "3", "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "digits_classifier.json").read_text())
    assert meta["steps"] == 3 and "test_accuracy" in meta
    assert "classifier:" in capsys.readouterr().out
    assert isinstance(d.load_classifier(tmp_path), d.DigitsClassifier)
