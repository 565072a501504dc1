"""Fashion-MNIST idx reader (on small idx files written here) and the imagefolder source."""
from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ijepa.data import ShardConfig, load_split, shard_dataset
from ijepa.data.config import FashionMnistConfig, ImageFolderConfig
from ijepa.data.fashion_mnist import FashionMnistSource, IdxError, read_idx
from ijepa.data.imagefolder import ImageFolderError, ImageFolderSource, load_image


def write_idx(path: Path, arr: np.ndarray, magic: int | None = None, extra: bytes = b"") -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    magic = (0x0800 | arr.ndim) if magic is None else magic
    data = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes() + extra
    with gzip.open(path, "wb") as fh:
        fh.write(data)


def make_fmnist(root: Path, n_train: int = 12, n_test: int = 5) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    d = {"train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train, dtype=np.uint8)),
         "test": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test, dtype=np.uint8))}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", d[split][0])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", d[split][1])
    return d


# ------------------------------------------------------------------------- fashion_mnist
def test_idx_reader_roundtrip_and_val_carving(tmp_path):
    d = make_fmnist(tmp_path / "fm")
    assert np.array_equal(read_idx(tmp_path / "fm" / "train-images-idx3-ubyte.gz"), d["train"][0])
    src = FashionMnistSource(FashionMnistConfig(root=str(tmp_path / "fm"), val_size=4), image_size=28, seed=3)
    got = {s: list(src.iter_split(s)) for s in src.splits()}
    assert [len(got[s]) for s in ("train", "val", "test")] == [8, 4, 5]
    # train + val is exactly the published train split, disjoint
    seen = sorted(x.image[:, :, 0].tobytes() for x in got["train"] + got["val"])
    assert seen == sorted(im.tobytes() for im in d["train"][0])
    for s in got["test"]:
        i = int(s.key.split("_")[1])
        assert np.array_equal(s.image[:, :, 0], d["test"][0][i]) and s.labels == {"cls": int(d["test"][1][i])}
    # the carving is seeded: same seed same val, other seed other val
    again = FashionMnistSource(FashionMnistConfig(root=str(tmp_path / "fm"), val_size=4), 28, seed=3)
    assert [x.image.tobytes() for x in again.iter_split("val")] == [x.image.tobytes() for x in got["val"]]
    other = FashionMnistSource(FashionMnistConfig(root=str(tmp_path / "fm"), val_size=4), 28, seed=4)
    assert [x.image.tobytes() for x in other.iter_split("val")] != [x.image.tobytes() for x in got["val"]]
    padded = next(FashionMnistSource(FashionMnistConfig(root=str(tmp_path / "fm"), val_size=4), 32).iter_split("test"))
    assert padded.image.shape == (32, 32, 1) and padded.image[:2].max() == 0


def test_idx_errors_name_the_file(tmp_path):
    root = tmp_path / "fm"
    make_fmnist(root)
    bad = root / "train-labels-idx1-ubyte.gz"
    write_idx(bad, np.zeros(12, np.uint8), magic=0x00000803)  # says 3-D
    with pytest.raises(IdxError, match="train-labels-idx1-ubyte.gz"):
        FashionMnistSource(FashionMnistConfig(root=str(root)), 28)
    write_idx(bad, np.zeros(12, np.uint8), magic=0x12340801)  # bad magic
    with pytest.raises(IdxError, match=r"train-labels-idx1-ubyte\.gz: bad idx magic"):
        read_idx(bad)
    write_idx(bad, np.zeros(12, np.uint8), extra=b"xx")  # size mismatch
    with pytest.raises(IdxError, match=r"train-labels-idx1-ubyte\.gz: header says 12"):
        read_idx(bad)
    write_idx(bad, np.zeros(11, np.uint8))  # count mismatch with the images
    with pytest.raises(IdxError, match="12 images but .*train-labels-idx1-ubyte.gz has 11"):
        FashionMnistSource(FashionMnistConfig(root=str(root)), 28)
    write_idx(bad, np.zeros(12, np.uint8))
    (root / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(IdxError, match="t10k-images-idx3-ubyte"):
        FashionMnistSource(FashionMnistConfig(root=str(root)), 28)
    with pytest.raises(IdxError, match="nowhere"):
        shard_dataset({"source": "fashion_mnist", "fashion_mnist": {"root": str(tmp_path / "nowhere")}},
                      tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- imagefolder
def _img(path: Path, size=(24, 18), colour=(200, 30, 30), fmt=None, exif=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, colour)
    kw = {"exif": exif} if exif is not None else {}
    im.save(path, format=fmt, **kw)
    return path


def make_tree(root: Path) -> None:
    for i in range(6):
        _img(root / "cat" / f"c{i}.png", colour=(200, 30 + i, 30))
        _img(root / "dog" / "sub" / f"d{i}.jpg", colour=(30, 30 + i, 200))
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image\n")
    good = (root / "cat" / "c0.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(good[: len(good) // 2 + 20])
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    big.save(root / "dog" / "cut.jpg", quality=90)
    data = (root / "dog" / "cut.jpg").read_bytes()
    (root / "dog" / "cut.jpg").write_bytes(data[: len(data) // 2])
    (root / ".hidden.png").write_bytes(b"ignored")


def test_imagefolder_skips_bad_files_by_reason_and_completes(tmp_path, caplog):
    root = tmp_path / "imgs"
    make_tree(root)
    cfg = {"source": "imagefolder", "image_size": 16, "imagefolder": {"root": str(root), "val_fraction": 0.2,
                                                                      "test_fraction": 0.2}}
    with caplog.at_level(logging.WARNING, logger="ijepa.data.imagefolder"):
        res = shard_dataset(cfg, tmp_path / "out", progress=False)
    m = res.manifest
    assert sum(res.skipped.values()) == 4
    assert res.skipped == {"empty_file": 1, "not_an_image": 1, "truncated": 2}
    assert m["skipped"] == res.skipped
    assert sum(m["splits"][s]["samples"] for s in m["splits"]) == 12
    assert m["labels"]["cls"]["names"] == ["cat", "dog"]
    assert "empty.png" in caplog.text or "notes.txt" in caplog.text or "cut.jpg" in caplog.text
    # stratified carving: each class gives round(6 * 0.2) = 1 to val and to test (before skipping)
    x, y = load_split(tmp_path / "out", "train")
    assert x.shape[1:] == (3, 16, 16)
    # class from the folder: cats are red, dogs blue
    red = (x[:, 0].float().mean((1, 2)) > x[:, 2].float().mean((1, 2))).long()
    assert np.array_equal(red.numpy(), (y["cls"] == 0).long().numpy())


def test_imagefolder_exif_orientation_and_crop(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "a" / "x.jpg"
    path.parent.mkdir(parents=True)
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    out = load_image(path, 16)
    assert out.shape == (16, 16, 3)
    assert out[1, 8, 0] > 200 and out[1, 8, 2] < 60     # top is red (the image's left side)
    assert out[14, 8, 2] > 200 and out[14, 8, 0] < 60   # bottom is blue


def test_imagefolder_split_layout(tmp_path):
    root = tmp_path / "imnet"
    for split, n in (("train", 5), ("val", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _img(root / split / c / f"{i}.png")
    _img(root / "val" / "c" / "0.png")  # a class only in val still gets an index
    src = ImageFolderSource(ImageFolderConfig(root=str(root), test_fraction=0.2), 8, seed=0)
    assert src.classes == ["a", "b", "c"] and src.split_layout
    assert [src.num_samples(s) for s in ("train", "val", "test")] == [8, 5, 2]  # test carved from train


def test_imagefolder_missing_or_empty_root_fails_before_writing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ImageFolderError, match=str(tmp_path / "absent")):
        shard_dataset({"source": "imagefolder", "imagefolder": {"root": str(tmp_path / "absent")}}, out, progress=False)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ImageFolderError, match=str(tmp_path / "empty")):
        shard_dataset(ShardConfig(source="imagefolder", imagefolder=ImageFolderConfig(root=str(tmp_path / "empty"))),
                      out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.staging-*"))


def test_fashion_mnist_shards_roundtrip_grey(tmp_path):
    d = make_fmnist(tmp_path / "fm", n_train=10, n_test=4)
    res = shard_dataset({"source": "fashion_mnist", "fashion_mnist": {"root": str(tmp_path / "fm"), "val_size": 2},
                         "max_samples": {"train": 5}}, tmp_path / "out", progress=False)
    m = res.manifest
    assert m["channels"] == 1 and m["image_size"] == 28 and m["labels"]["cls"]["num_classes"] == 10
    assert {s: m["splits"][s]["samples"] for s in m["splits"]} == {"train": 5, "val": 2, "test": 4}
    x, y = load_split(tmp_path / "out", "test")
    assert x.shape == (4, 1, 28, 28)
    assert np.array_equal(x[:, 0].numpy(), d["test"][0]) and np.array_equal(y["cls"].numpy(), d["test"][1])


def test_unlabelled_folder_and_empty_split(tmp_path):
    for i in range(5):
        _img(tmp_path / "flat" / f"{i}.png", size=(10 + i, 12))
    res = shard_dataset({"source": "imagefolder", "image_size": 8,
                         "imagefolder": {"root": str(tmp_path / "flat"), "val_fraction": 0.2, "test_fraction": 0.0}},
                        tmp_path / "out", progress=False)
    m = res.manifest
    assert m["labels"] == {} and m["splits"]["test"] == {"samples": 0, "num_shards": 0, "bytes": 0, "shards": [],
                                                         "skipped": {}}
    x, y = load_split(tmp_path / "out", "train")
    assert x.shape == (4, 3, 8, 8) and y == {}
    x, y = load_split(tmp_path / "out", "test")
    assert x.shape == (0, 3, 8, 8)
