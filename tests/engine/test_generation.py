"""``indis generate`` / ``indis fd`` (``engine/generation.py``): seeds, labels, schedules, the PNG writer, the
samples file, and torchrun's split equal to one process bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from indis.engine.cli import main as cli
from indis.engine.core.schedules import Schedule, get_sigmas
from indis.engine.generation import (
    BACKBONES,
    fd_report,
    feature_space,
    generate,
    image_grid,
    load_samples,
    parse_seeds,
    resolve_schedule,
    save,
    seed_labels,
    write_png,
)
from indis.engine.testbeds.digits import WEIGHTS_DIR
from indis.engine.tuning.teacher import labels_from_seeds

DIGITS = BACKBONES["digits-unet"]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def test_seed_lists_and_labels() -> None:
    assert parse_seeds("0-3,10,12-13") == [0, 1, 2, 3, 10, 12, 13]
    for bad in ("", "a-3", "5-2", "-1", "0-3,2", f"0-{10**12}", f"{2**63}"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)
    seeds = [4, 5, 6]
    assert torch.equal(seed_labels(seeds, DIGITS, "seeds"), labels_from_seeds(seeds, 10))
    assert seed_labels(seeds, DIGITS, "none") is None
    assert seed_labels(seeds, DIGITS, "7").tolist() == [7, 7, 7]
    for bad in ("10", "-1", "cat"):
        with pytest.raises(ValueError, match="--labels"):
            seed_labels(seeds, DIGITS, bad)


def test_schedules_by_name_file_and_head(tmp_path: Path) -> None:
    model = DIGITS.load(None)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(resolve_schedule("logsnr", model, DIGITS, 5, "ipndm")(x, None),
                       get_sigmas("logsnr", 5, 0.002, 80.0))
    grid = get_sigmas("edm", 4, 0.002, 80.0)
    (tmp_path / "g.json").write_text(json.dumps({"grid": grid.tolist(), "shift": [0.01] * 4}))
    s = resolve_schedule(str(tmp_path / "g.json"), model, DIGITS, 4, "ipndm")(x, None)
    assert isinstance(s, Schedule) and torch.equal(s.grid, grid) and s.shift.tolist() == [0.01] * 4
    with pytest.raises(ValueError, match="holds 4 steps"):
        resolve_schedule(str(tmp_path / "g.json"), model, DIGITS, 5, "ipndm")
    (tmp_path / "other.json").write_text(json.dumps({"grid": grid.tolist(), "backbone": "fashion-unet"}))
    with pytest.raises(ValueError, match="tuned for backbone 'fashion-unet'"):
        resolve_schedule(str(tmp_path / "other.json"), model, DIGITS, 4, "ipndm", name="digits-unet")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a grid file"):
        resolve_schedule(str(tmp_path / "bad.json"), model, DIGITS, 5, "ipndm")
    head = WEIGHTS_DIR / "indis" / "digits-unet_ipndm_nfe5_phi.safetensors"
    phi = resolve_schedule(str(head), model, DIGITS, 5, "ipndm", name="digits-unet")
    out = phi(x, torch.tensor([1, 2]))
    assert out.grid.shape == (2, 6)
    with pytest.raises(ValueError):
        resolve_schedule(str(head), model, DIGITS, 3, "ipndm", name="digits-unet")  # tuned for NFE 5
    with pytest.raises(ValueError, match="--schedule"):
        resolve_schedule("karras-ish", model, DIGITS, 5, "ipndm")


def test_generate_chunks_do_not_depend_on_the_chunk_size_of_others() -> None:
    """Every chunk is the same computation however many there are: 8 seeds in chunks of 4 equal the first
    chunk alone; labels enter as class labels."""
    model = DIGITS.load(None)
    fn = resolve_schedule("edm", model, DIGITS, 3, "ipndm")
    seeds = list(range(8))
    labels = seed_labels(seeds, DIGITS, "seeds")
    every = generate(model, DIGITS, seeds, labels, fn, "ipndm", batch_size=4, progress=False)
    first = generate(model, DIGITS, seeds[:4], labels[:4], fn, "ipndm", batch_size=4, progress=False)
    assert every.shape == (8, 1, 8, 8) and torch.equal(every[:4], first)
    other = generate(model, DIGITS, seeds[:4], seed_labels(seeds[:4], DIGITS, "none"), fn, "ipndm",
                     batch_size=4, progress=False)
    assert not torch.equal(other, first)


def test_png_and_samples_file_round_trip(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    samples = torch.linspace(-1.2, 1.2, 5 * 64).reshape(5, 1, 8, 8)
    grid = image_grid(samples)
    assert grid.shape == (2 * 9 + 1, 3 * 9 + 1) and grid.dtype == np.uint8
    assert grid[1, 1] == 0 and grid[1 + 9 + 7, 1 + 9 + 7] == 255  # clamped ends
    write_png(tmp_path / "g.png", grid)
    assert np.array_equal(np.asarray(image.open(tmp_path / "g.png")), grid)
    npz, png = save(tmp_path / "out", samples, [3, 4, 5, 6, 7], None, {"backbone": "digits-unet"})
    got, seeds, labels, settings = load_samples(npz)
    assert torch.equal(got, samples) and seeds.tolist() == [3, 4, 5, 6, 7] and (labels == -1).all()
    assert settings == {"backbone": "digits-unet"} and png.exists()
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a samples file"):
        load_samples(tmp_path / "junk.npz")
    huge = np.lib.format.open_memmap(tmp_path / "samples.npy", mode="w+", dtype=np.float32, shape=(1,))
    del huge
    header = (tmp_path / "samples.npy").read_bytes().replace(b"(1,)", b"(1099511627776,)")
    import zipfile

    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as z:  # declares 4 TiB of samples in a few bytes
        z.writestr("samples.npy", header)
        for k in ("seeds", "labels"):
            np.save(tmp_path / f"{k}.npy", np.zeros(1, np.int64))
            z.write(tmp_path / f"{k}.npy", f"{k}.npy")
        np.save(tmp_path / "settings.npy", np.array("{}"))
        z.write(tmp_path / "settings.npy", "settings.npy")
    with pytest.raises(ValueError, match="declares"):
        load_samples(tmp_path / "bomb.npz")
    np.savez(tmp_path / "five.npz", samples=samples.numpy(), seeds=np.arange(5), labels=np.zeros(5, np.int64),
             settings=np.array("5"))
    with pytest.raises(ValueError, match="wrong kind"):
        load_samples(tmp_path / "five.npz")


def test_fd_to_the_data_and_to_a_teacher(tmp_path: Path) -> None:
    model = DIGITS.load(None)
    seeds = list(range(32))
    labels = seed_labels(seeds, DIGITS, "seeds")
    for name, nfe in (("a", 3), ("teacher", 20)):
        fn = resolve_schedule("edm", model, DIGITS, nfe, "ipndm")
        xs = generate(model, DIGITS, seeds, labels, fn, "ipndm", batch_size=16, progress=False)
        save(tmp_path / name, xs, seeds, labels, {"backbone": "digits-unet"})
    out = fd_report(tmp_path / "a" / "samples.npz", tmp_path / "teacher" / "samples.npz")
    assert out["n"] == 32 and out["fd_data"] > 0 and out["fd_teacher"] > 0 and 0 <= out["accuracy"] <= 1
    assert fd_report(tmp_path / "teacher" / "samples.npz", tmp_path / "teacher" / "samples.npz")[
        "fd_teacher"] < 1e-6
    save(tmp_path / "other", xs[:8], seeds[:8], labels[:8], {"backbone": "digits-unet"})
    with pytest.raises(ValueError, match="other seeds"):
        fd_report(tmp_path / "a" / "samples.npz", tmp_path / "other" / "samples.npz")
    save(tmp_path / "relabelled", xs, seeds, (labels + 1) % 10, {"backbone": "digits-unet"})
    with pytest.raises(ValueError, match="other labels"):
        fd_report(tmp_path / "a" / "samples.npz", tmp_path / "relabelled" / "samples.npz")


def test_feature_spaces_of_the_datasets() -> None:
    """One place says which classifier and reference images judge a dataset's samples: the digits space is
    the digits FD of ``testbeds.digits`` (all 1,797 images); Fashion-MNIST's is its test set."""
    from indis.engine.testbeds import fashion
    from indis.engine.testbeds.digits import fd_to_data, load_digits_images

    x = load_digits_images("test")[0][:64] * 0.9
    space = feature_space("digits")
    assert feature_space("digits", WEIGHTS_DIR) is feature_space("digits", str(WEIGHTS_DIR)) is not space
    assert space.reference.shape == (1797, space.classifier.config["feature_dim"])
    assert space.fd_to_data(x) == fd_to_data(x)
    assert {b.dataset for b in BACKBONES.values()} == {"digits", "fashion"}
    with pytest.raises(ValueError, match="unknown dataset"):
        feature_space("cifar")
    if not fashion.available():
        pytest.skip(f"Fashion-MNIST is not installed ({fashion.DEBIAN_PACKAGE})")
    space = feature_space("fashion")
    test = fashion.load_fashion_images("test")[0]
    assert space.reference.shape[0] == 10_000 and "Fashion-MNIST test set" in space.description
    assert space.fd_to_data(test) < 1e-6  # the test set against itself
    assert space.fd_to_data(test[:1000]) > 1.0  # the first 1000 images differ from all 10,000


@pytest.mark.parametrize("nfe", [3, 5, 7])
def test_shipped_fashion_schedules_load_as_generate_schedules(nfe: int) -> None:
    """The Fashion UNet's shipped INDIS heads and global grids (engine/weights/indis) are what
    ``indis generate --schedule`` takes: phi gives each sample its own grid, GITS / LD3 one grid."""
    fashion = BACKBONES["fashion-unet"]
    model = fashion.load(None)
    x, labels = torch.randn(4, 1, 28, 28) * 80, torch.tensor([0, 3, 3, 9])
    stem = WEIGHTS_DIR / "indis" / f"fashion-unet_ipndm_nfe{nfe}"
    phi = resolve_schedule(f"{stem}_phi.safetensors", model, fashion, nfe, "ipndm", name="fashion-unet")
    s = phi(x, labels)
    assert s.grid.shape == (4, nfe + 1) and bool((s.grid[:, 1:] < s.grid[:, :-1]).all())
    for tag in ("gits", "ld3"):
        fn = resolve_schedule(f"{stem}_{tag}.json", model, fashion, nfe, "ipndm", name="fashion-unet")
        g = fn(x, labels)
        assert g.grid.shape == (nfe + 1,) and g.grid[0] == 80.0
    with pytest.raises(ValueError, match="tuned for backbone"):  # not a digits schedule
        resolve_schedule(f"{stem}_gits.json", DIGITS.load(None), DIGITS, nfe, "ipndm", name="digits-unet")


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["generate", "--backbone", "digits-unet", "--seeds", "9-1", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this Python")
def test_torchrun_with_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """The acceptance command's shape on the digits UNet (fast): 2 ranks over gloo write the same .npz
    contents as one process, bit for bit."""
    args = ["generate", "--backbone", "digits-unet", "--nfe", "4", "--seeds", "0-39", "--batch-size", "8",
            "--no-progress"]
    assert cli([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": ""}
    launch = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "indis.engine.cli"]  # a free port
    run = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = (np.load(tmp_path / d / "samples.npz") for d in ("one", "two"))
    assert np.array_equal(one["samples"], two["samples"]) and np.array_equal(one["labels"], two["labels"])
    assert json.loads(str(two["settings"]))["world_size"] == 2
