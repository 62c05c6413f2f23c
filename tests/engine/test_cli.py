"""The ``indis`` command line: a user's mistake is one line on stderr and exit status 2; ``fit`` checks its
output path before any tuning."""

from __future__ import annotations

import pytest

from indis.engine import cli
from indis.engine.core.predictor import Predictor
from indis.engine.tuning.fit import BLIND_FIT


@pytest.mark.parametrize(("argv", "match"), [
    (["eval", "/nonexistent/phi.safetensors"], "does not exist"),
    (["eval", "/"], "is a directory"),
    (["fit", "--out", "/proc/phi.safetensors"], "cannot be written"),
    (["fit", "--out", "/"], "is a directory"),
    (["fit", "--out", "/tmp/no-such-folder-indis/"], "is a directory"),
    (["export"], "nothing to export"),
])
def test_user_mistakes_print_one_line_and_exit_2(argv: list[str], match: str, capsys,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import indis.engine.tuning.fit as tuning

    def no_tuning(*a, **kw):
        raise AssertionError("tuning started before the output path was checked")

    monkeypatch.setattr(tuning, "fit_predictor", no_tuning)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"indis {argv[0]}: error: ") and match in err, err


def test_fit_checks_its_arguments_before_building_teacher_end_points(tmp_path, capsys,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import indis.engine.tuning.fit as tuning

    def no_teacher(self):
        raise AssertionError("teacher end points were built before the arguments were checked")

    monkeypatch.setattr(tuning.TuningSetup, "data", no_teacher)
    for bad in (["--pool", "0"], ["--hidden", "0"], ["--shift-bound", "-1"]):
        assert cli.main(["fit", *bad, "--out", str(tmp_path / "phi.safetensors")]) == 2
        assert capsys.readouterr().err.startswith("indis fit: error: ")


def test_an_internal_error_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_export", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["export", "--model", "unet"])


def test_check_writable_leaves_no_probe_behind(tmp_path) -> None:
    out = cli.check_writable(tmp_path / "new" / "phi.safetensors")
    assert out.parent.is_dir() and list(out.parent.iterdir()) == []


def test_cli_fit_then_eval(tmp_path, capsys) -> None:
    from indis.engine.cli import main

    out = tmp_path / "phi.safetensors"
    main(["fit", "--nfe", "2", "--solver", "euler", "--num-train", "16", "--num-val", "8", "--steps", "3",
          "--batch-size", "8", "--hidden", "8", "--cache", str(tmp_path), "--out", str(out)])
    phi = Predictor.load(out, nfe=2, solver="euler", backbone="digits-unet")
    assert len(phi.metadata["fit"]) == 2
    # --steps reaches the blind stage's Adam steps, which keeps the state after its L-BFGS finish
    assert phi.metadata["fit"][0]["best_step"] == 3 + BLIND_FIT.lbfgs_steps
    main(["eval", str(out), "--samples", "8", "--cache", str(tmp_path)])
    text = capsys.readouterr().out
    assert "INDIS phi" in text and "heuristic edm" in text and "8 held-out seeds" in text
