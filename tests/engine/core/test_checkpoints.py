"""Hostile checkpoint files: configuration is matched against the tensors before anything is allocated, the
checksum covers the configuration, and paths that are not regular files get a clear error."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from indis.engine.core.checkpoints import check_shapes, checkpoint_file
from indis.engine.core.predictor import Predictor, PredictorConfig, ScheduleConfig
from indis.engine.testbeds import digits


def _head(tmp_path: Path) -> Path:
    sc = ScheduleConfig(nfe=3, sigma_min=0.002, sigma_max=80.0)
    head = Predictor(PredictorConfig(sc, "ipndm", (1, 8, 8), pool=2, hidden=16, num_classes=10))
    return head.save(tmp_path / "phi.safetensors")


def _rewrite(path: Path, out: Path, edit) -> Path:
    """``path`` with its JSON header edited by ``edit(meta)`` and the tensors (and checksum) unchanged."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["indis"])
    edit(meta)
    save_file(load_file(str(path)), str(out), metadata={"indis": json.dumps(meta)})
    return out


@pytest.mark.parametrize(("field", "value"), [
    ("hidden", 10**9), ("depth", 10**6), ("num_classes", 10**9), ("shape", [10**6, 8, 8]),
    ("pool", 10**5), ("schedule.nfe", 10**9), ("hidden", 1.5), ("hidden", "16"),
])
def test_a_configuration_that_does_not_fit_the_tensors_is_refused_before_any_allocation(
        tmp_path, field: str, value: object) -> None:
    def edit(meta: dict) -> None:
        *outer, key = field.split(".")
        target = meta["config"]
        for k in outer:
            target = target[k]
        target[key] = value

    bad = _rewrite(_head(tmp_path), tmp_path / "bad.safetensors", edit)
    with pytest.raises(ValueError, match="does not match its tensors|invalid configuration|no valid indis"):
        Predictor.load(bad)


@pytest.mark.parametrize(("field", "value"), [
    ("solver", "unipc"), ("schedule.sigma_max", 81.0), ("input_scale", 0.5), ("class_scale", 2.0),
    ("schedule.shift_bound", 0.3), ("backbone", "digits-dit"),
])
def test_the_checksum_covers_the_configuration(tmp_path, field: str, value: object) -> None:
    def edit(meta: dict) -> None:
        target = meta["config"]
        *outer, key = field.split(".")
        for k in outer:
            target = target[k]
        target[key] = value

    path = _head(tmp_path)
    Predictor.load(path, solver="ipndm")
    with pytest.raises(ValueError, match="corrupt"):
        Predictor.load(_rewrite(path, tmp_path / "edited.safetensors", edit))


def test_non_finite_configuration_values_are_refused() -> None:
    for kw in (dict(sigma_max=float("inf")), dict(sigma_max=float("nan")), dict(rho=0.0),
               dict(shift_bound=float("inf"))):
        with pytest.raises(ValueError):
            ScheduleConfig(**{"nfe": 3, "sigma_min": 0.002, "sigma_max": 80.0, **kw})
    sc = ScheduleConfig(nfe=3, sigma_min=0.002, sigma_max=80.0)
    for kw in (dict(input_scale=float("nan")), dict(input_scale=-1.0), dict(class_scale=float("inf")),
               dict(shape=(0, 4)), dict(num_classes=-1)):
        with pytest.raises(ValueError):
            PredictorConfig(sc, "euler", **{"shape": (4,), **kw})


def test_paths_that_are_not_regular_files_get_their_own_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Predictor.load(tmp_path / "missing.safetensors")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        Predictor.load(tmp_path)
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block forever
    with pytest.raises(ValueError, match="not a regular file"):
        Predictor.load(fifo)
    assert checkpoint_file(_head(tmp_path), "x").is_file()


@pytest.mark.parametrize(("key", "value"), [("emb_dim", 10**7), ("channels", [16, 32, 10**6]),
                                            ("num_blocks", 10**5), ("channels", [16] * 10**5),
                                            ("heads", 0), ("no_such_argument", 1)])
def test_digits_weights_with_a_tampered_architecture_are_refused(tmp_path, key: str, value: object) -> None:
    for f in digits.WEIGHTS_DIR.glob("digits_unet.*"):
        shutil.copy(f, tmp_path)
    meta_path = tmp_path / "digits_unet.json"
    meta = json.loads(meta_path.read_text())
    meta["arch"][key] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match its tensors|invalid configuration"):
        digits.load_backbone("unet", weights_dir=tmp_path)


def test_check_shapes_counts_only_its_own_thread_and_removes_its_hooks() -> None:
    import threading

    shapes = {"weight": (2, 3), "bias": (2,)}
    check_shapes(lambda: torch.nn.Linear(3, 2), shapes, "linear")
    with pytest.raises(ValueError, match=r"weight should be \[2, 4\]"):
        check_shapes(lambda: torch.nn.Linear(4, 2), shapes, "linear")
    with pytest.raises(ValueError, match="more than"):
        check_shapes(lambda: torch.nn.Sequential(*[torch.nn.Linear(3, 2) for _ in range(100)]), shapes, "x")
    built: list[torch.nn.Module] = []

    def build_while_another_thread_builds() -> torch.nn.Module:  # hooks are live during the worker's build
        worker = threading.Thread(target=lambda: built.append(torch.nn.Sequential(
            *[torch.nn.Linear(1, 1) for _ in range(500)])))
        worker.start()
        worker.join()
        return torch.nn.Linear(3, 2)

    check_shapes(build_while_another_thread_builds, shapes, "linear")
    assert len(built) == 1 and len(built[0]) == 500
    assert len(torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(500)])) == 500  # no hook left


def test_buffers_derived_from_the_configuration_count_too(tmp_path) -> None:
    """The DiT's positional table is not saved: a larger img_resolution builds a bigger one from the
    configuration alone -- refused before it is allocated."""
    for f in digits.WEIGHTS_DIR.glob("digits_dit.*"):
        shutil.copy(f, tmp_path)
    meta_path = tmp_path / "digits_dit.json"
    meta = json.loads(meta_path.read_text())
    meta["arch"]["img_resolution"] = 2000
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="more than twice"):
        digits.load_backbone("dit", weights_dir=tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "deeply nested JSON", "heads 0"])
def test_every_broken_digits_file_is_a_value_error(tmp_path, damage: str) -> None:
    for f in digits.WEIGHTS_DIR.glob("digits_dit.*"):
        shutil.copy(f, tmp_path)
    weights, meta_path = tmp_path / "digits_dit.safetensors", tmp_path / "digits_dit.json"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "deeply nested JSON":
        meta_path.write_text("[" * 100_000 + "]" * 100_000)
    else:
        meta = json.loads(meta_path.read_text())
        meta["arch"]["heads"] = 0
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError):
        digits.load_backbone("dit", weights_dir=tmp_path)


@pytest.mark.parametrize(("key", "value"), [("heads", 8), ("sigma_data", float("nan")), ("dropout", 0.5)])
def test_digits_edits_that_keep_every_shape_fail_the_checksum(tmp_path, key: str, value: object) -> None:
    for f in digits.WEIGHTS_DIR.glob("digits_unet.*"):
        shutil.copy(f, tmp_path)
    digits.load_backbone("unet", weights_dir=tmp_path)  # the untouched copy loads
    meta_path = tmp_path / "digits_unet.json"
    meta = json.loads(meta_path.read_text())
    meta["arch"][key] = value
    meta_path.write_text(json.dumps(meta))
    digits._cached.cache_clear()
    with pytest.raises(ValueError, match="corrupt or were edited"):
        digits.load_backbone("unet", weights_dir=tmp_path)


def test_a_file_resaved_in_a_narrower_dtype_cannot_stretch_the_bound(tmp_path) -> None:
    from indis.engine.core.checkpoints import state_checksum

    for f in digits.WEIGHTS_DIR.glob("digits_dit.*"):
        shutil.copy(f, tmp_path)
    weights, meta_path = tmp_path / "digits_dit.safetensors", tmp_path / "digits_dit.json"
    narrow = {k: v.to(torch.uint8) for k, v in load_file(str(weights)).items()}
    save_file(narrow, str(weights))
    meta = json.loads(meta_path.read_text())
    meta["checksum"] = state_checksum(narrow, meta["arch"])  # resealed: only the size rule can catch it
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="bytes .* more than twice"):
        digits.load_backbone("dit", weights_dir=tmp_path)
