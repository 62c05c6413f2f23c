"""The Fashion-MNIST loader: the committed tiny IDX fixture (gzipped and raw files), hostile files, and the
installed data where the Debian package is present."""

from __future__ import annotations

import gzip
import shutil
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from indis.engine.testbeds import fashion
from indis.engine.testbeds.fashion import load_fashion, load_fashion_images, read_idx

FIXTURE = Path(__file__).resolve().parents[2] / "data" / "fashion"


def _pattern(n: int) -> np.ndarray:
    """What the fixture's images hold: pixel (i, j) of image k is (31 k + 7 i + j) mod 256."""
    k, i, j = np.arange(n)[:, None, None], np.arange(28)[None, :, None], np.arange(28)[None, None, :]
    return ((k * 31 + i * 7 + j) % 256).astype(np.uint8)


def test_the_fixture_reads_back_as_written() -> None:
    for split, n, first_label in (("train", 3, 0), ("test", 2, 1)):
        images, labels = load_fashion(split, FIXTURE)
        assert images.dtype == np.uint8 and np.array_equal(images, _pattern(n))
        assert labels.dtype == np.int64 and labels.tolist() == [(3 * i + first_label) % 10 for i in range(n)]
    x, y = load_fashion_images("train", FIXTURE)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x[:, 0], torch.from_numpy(_pattern(3)).float() / 127.5 - 1, rtol=0, atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1


def test_a_missing_directory_names_the_package_and_the_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as e:
        load_fashion("train", tmp_path)
    assert "train-images-idx3-ubyte" in str(e.value) and "--data" in str(e.value)
    assert not fashion.available(tmp_path) and fashion.available(FIXTURE)
    with pytest.raises(ValueError, match="split"):
        load_fashion("validation", FIXTURE)  # type: ignore[arg-type]


def _idx(payload: bytes, dims: tuple[int, ...], code: int = 8) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}i", *dims) + payload


@pytest.mark.parametrize(("content", "match"), [
    (b"", "not an IDX file"),
    (b"\x01\x00\x08\x01", "not an IDX file"),                      # bad magic
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "not an IDX file"),  # unknown type code
    (b"\x00\x00\x08\x03\x00\x00", "truncated header"),
    (_idx(b"\x00" * 5, (2, 3)), "truncated"),
    (_idx(b"\x00" * 7, (2, 3)), "longer than its header"),
    (_idx(b"", (1 << 16, 1 << 16)), "limit"),                       # 4 GiB declared: refused up front
    (_idx(b"", (-1, 3)), "negative"),
])
def test_hostile_idx_files_are_refused(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_idx(path)
    gz = tmp_path / "bad-idx.gz"
    gz.write_bytes(gzip.compress(content))
    with pytest.raises(ValueError, match=match):
        read_idx(gz)


def test_a_gzip_bomb_is_read_only_as_far_as_its_header_declares(tmp_path: Path) -> None:
    """A tiny header followed by 64 MiB of zeros: refused after reading the declared 6 bytes and one (the
    peak of Python allocations stays far below what decompressing it all would take)."""
    import tracemalloc

    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(_idx(b"\x00" * (64 << 20), (2, 3))))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="longer than its header"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    (tmp_path / "broken.gz").write_bytes(b"\x1f\x8b not gzip at all")
    with pytest.raises(ValueError, match="cannot be read"):
        read_idx(tmp_path / "broken.gz")
    corrupt = bytearray(gzip.compress(_idx(bytes(range(256)) * 4, (1024,))))
    corrupt[10] = 0xFF  # the first deflate block header: an invalid block type
    (tmp_path / "corrupt.gz").write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="cannot be read"):
        read_idx(tmp_path / "corrupt.gz")


def test_other_types_and_byte_orders(tmp_path: Path) -> None:
    values = np.array([[1.5, -2.25], [1e10, 0.0]])
    path = tmp_path / "floats"
    path.write_bytes(_idx(values.astype(">f8").tobytes(), (2, 2), code=0x0E))
    got = read_idx(path)
    assert got.dtype == np.float64 and got.dtype.isnative and np.array_equal(got, values)
    path.write_bytes(_idx(np.array([-3, 70000], dtype=">i4").tobytes(), (2,), code=0x0C))
    assert read_idx(path).tolist() == [-3, 70000]


def test_inconsistent_image_and_label_files_are_refused(tmp_path: Path) -> None:
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (tmp_path / name).write_bytes(_idx(_pattern(2).tobytes(), (2, 28, 28)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(b"\x01\x02", (2,)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(b"\x01\x02\x03", (3,)))
    with pytest.raises(ValueError, match="expected 2 labels"):
        load_fashion("train", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(b"\x01\x0a", (2,)))
    with pytest.raises(ValueError, match="labels outside"):
        load_fashion("train", tmp_path)
    floats = np.array([1.0, 2.7], ">f4").tobytes()
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(floats, (2,), 0x0D))
    with pytest.raises(ValueError, match="uint8 labels"):
        load_fashion("train", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(b"\x00" * (2 * 32 * 32), (2, 32, 32)))
    with pytest.raises(ValueError, match=r"\[N, 28, 28\]"):
        load_fashion("test", tmp_path)


@pytest.mark.skipif(not fashion.available(), reason=f"{fashion.DEBIAN_PACKAGE} is not installed "
                    f"({fashion.DEBIAN_DIR})")
def test_the_installed_data_has_the_published_sizes_and_balanced_classes() -> None:
    for split, n in (("train", 60_000), ("test", 10_000)):
        images, labels = load_fashion(split)
        assert images.shape == (n, 28, 28)
        assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_unet_training_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six steps straight; six steps failing at the fifth (an injected fault: the checkpoint of step 4
    stays) then resumed; six steps interrupted by SIGINT during the fifth (it finishes, is saved, then
    stops) then resumed: bit-identical EMA weights. A checkpoint of another configuration is refused."""
    kw = dict(steps=6, data=FIXTURE, progress=False, batch_size=2, checkpoint_every=4, warmup=2)
    straight, rec = fashion.train_unet(tmp_path / "a", **kw)
    assert rec["steps"] == 6 and rec["data"]["n_train"] == 3
    calls = {"n": 0}
    from indis.engine.testbeds import digits

    real_loss = digits.edm_loss

    def faulty(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(digits, "edm_loss", faulty)  # the training step's loss
    with pytest.raises(RuntimeError, match="injected"):
        fashion.train_unet(tmp_path / "b", **kw)
    assert torch.load(tmp_path / "b" / "fashion_unet.ckpt", weights_only=True)["state"]["step"] == 4
    assert not (tmp_path / "b" / "fashion_unet.safetensors").exists()
    fashion.train_unet(tmp_path / "b", **kw)
    a, b = (_weights(tmp_path / d / "fashion_unet.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    calls["n"] = -100  # an interrupt in the fifth step: that step finishes, is saved, then it stops
    monkeypatch.setattr(digits, "edm_loss", lambda *a, **k: (
        calls.__setitem__("n", calls["n"] + 1), calls["n"] == -95 and signal.raise_signal(signal.SIGINT),
        real_loss(*a, **k))[2])
    with pytest.raises(KeyboardInterrupt, match="after step 5"):
        fashion.train_unet(tmp_path / "c", **kw)
    assert torch.load(tmp_path / "c" / "fashion_unet.ckpt", weights_only=True)["state"]["step"] == 5
    fashion.train_unet(tmp_path / "c", **kw)
    c = _weights(tmp_path / "c" / "fashion_unet.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    loaded = fashion.load_backbone(tmp_path / "b")
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), straight.parameters(), strict=True))
    with pytest.raises(ValueError, match="another configuration"):
        fashion.train_unet(tmp_path / "b", **{**kw, "lr": 5e-4})
    other = tmp_path / "other-data"  # the same file names, one label changed: refused as other data
    shutil.copytree(FIXTURE, other)
    (other / "train-labels-idx1-ubyte").write_bytes(_idx(b"\x00\x03\x07", (3,)))
    with pytest.raises(ValueError, match="other data"):
        fashion.train_unet(tmp_path / "b", **{**kw, "data": other})
    done, _ = fashion.train_unet(tmp_path / "b", **{**kw, "checkpoint_every": 2})  # how often: not a change
    assert all(torch.equal(p, q) for p, q in zip(done.parameters(), straight.parameters(), strict=True))


def test_classifier_training_writes_a_loadable_model(tmp_path: Path) -> None:
    model, rec = fashion.train_classifier(tmp_path, steps=3, data=FIXTURE, progress=False, batch_size=4)
    assert 0.0 <= rec["test_accuracy"] <= 1.0 and rec["steps"] == 3
    loaded = fashion.load_classifier(tmp_path)
    x, y = load_fashion_images("test", FIXTURE)
    assert fashion.accuracy(loaded, x, y) == rec["test_accuracy"]
    assert torch.equal(loaded(x), model(x))


def test_the_shipped_models_load_and_sample() -> None:
    """The shipped UNet and classifier pass their checksums; a 3-step class-conditional sample of 4 seeds is
    finite, in the data's range give or take, and depends on the label."""
    model, clf = fashion.load_backbone(), fashion.load_classifier()
    assert model.metadata["params"] == sum(p.numel() for p in model.parameters())
    from indis.engine.testbeds.digits import WEIGHTS_DIR

    assert sum(p.stat().st_size for p in WEIGHTS_DIR.glob("fashion_*")) < 30 * 2**20  # the budget
    from indis.engine.testbeds.digits import sample_backbone

    labels = torch.tensor([0, 1, 8, 9])
    xs = sample_backbone(model, 4, steps=3, solver="ipndm", class_labels=labels)
    assert xs.shape == (4, 1, 28, 28) and torch.isfinite(xs).all() and xs.abs().max() < 3
    other = sample_backbone(model, 4, steps=3, solver="ipndm", class_labels=labels.flip(0))
    assert not torch.equal(xs, other)
    assert clf(xs.clamp(-1, 1)).shape == (4, 10)


@pytest.mark.skipif(not fashion.available(), reason=f"{fashion.DEBIAN_PACKAGE} is not installed")
def test_the_shipped_classifier_reads_the_test_set() -> None:
    """The FD / accuracy classifier is a real Fashion-MNIST classifier: at least 90 % on the test set (its
    training record says what it reached)."""
    x, y = load_fashion_images("test")
    acc = fashion.accuracy(fashion.load_classifier(), x, y)
    assert acc >= 0.9 and acc == pytest.approx(fashion.load_classifier().metadata["test_accuracy"], abs=1e-6)
