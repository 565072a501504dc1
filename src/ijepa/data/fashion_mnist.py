"""Fashion-MNIST from its four idx files (Debian: package dataset-fashion-mnist).

Files (gzip, or the same names without .gz): train-images-idx3-ubyte, train-labels-idx1-ubyte,
t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte. Train (60,000) and test (10,000) as
published; `val` is carved from train by a permutation seeded from (seed, "val-carve"),
so train and val are disjoint and fixed for a seed. Grey 28x28, label `cls` (10 classes).
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from ijepa.data.common import Sample
from ijepa.data.config import FashionMnistConfig
from ijepa.seeding import rng_for

__all__ = ["CLASSES", "FILES", "IdxError", "read_idx", "load_fashion_mnist", "FashionMnistSource"]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class IdxError(ValueError):
    """An idx file is missing, unreadable or not what it should be (the message names it)."""


def _find(root: Path, name: str) -> Path:
    for cand in (root / f"{name}.gz", root / name):
        if cand.is_file():
            return cand
    raise IdxError(f"idx file not found: {root / (name + '.gz')} (nor {root / name}); on Debian install "
                   f"the package dataset-fashion-mnist, or set fashion_mnist.root to the folder with the four "
                   f"*-ubyte.gz files")


def read_idx(path: str | Path, expect_ndim: int | None = None) -> np.ndarray:
    """Read an idx file (gzip or raw): magic 0x0000TTNN (TT data type, NN dimensions), big-endian
    int32 dims, then the data. Raises IdxError naming the file on any mismatch."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as err:
        raise IdxError(f"{path}: cannot read ({err})") from None
    if len(data) < 4:
        raise IdxError(f"{path}: too short for an idx header ({len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code not in _IDX_TYPES or ndim == 0:
        raise IdxError(f"{path}: bad idx magic number 0x{int.from_bytes(data[:4], 'big'):08X} "
                       f"(expected 0x0000TTNN, e.g. 0x00000803 for ubyte images, 0x00000801 for ubyte labels)")
    if expect_ndim is not None and ndim != expect_ndim:
        raise IdxError(f"{path}: idx magic 0x{int.from_bytes(data[:4], 'big'):08X} says {ndim} dimensions, "
                       f"expected {expect_ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[dtype_code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise IdxError(f"{path}: header says {' x '.join(map(str, dims))} values ({expected} bytes) but the file "
                       f"has {len(data) - header} data bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def load_fashion_mnist(root: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (uint8 [60000, 28, 28], uint8 [60000]), "test": (...)} with sizes and labels checked."""
    root = Path(root)
    if not root.is_dir():
        raise IdxError(f"Fashion-MNIST folder not found: {root} (Debian: apt-get install dataset-fashion-mnist, "
                       f"or set fashion_mnist.root)")
    out = {}
    for split, (img_name, lab_name) in FILES.items():
        ip, lp = _find(root, img_name), _find(root, lab_name)
        images = read_idx(ip, expect_ndim=3)
        labels = read_idx(lp, expect_ndim=1)
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise IdxError(f"{ip if images.dtype != np.uint8 else lp}: expected unsigned-byte data")
        if images.shape[0] != labels.shape[0]:
            raise IdxError(f"{ip} has {images.shape[0]} images but {lp} has {labels.shape[0]} labels")
        if images.shape[0] == 0:
            raise IdxError(f"{ip}: no images")
        if labels.max() >= len(CLASSES):
            raise IdxError(f"{lp}: label {int(labels.max())} out of range 0..{len(CLASSES) - 1}")
        out[split] = (images, labels)
    shapes = {s: v[0].shape[1:] for s, v in out.items()}
    if len(set(shapes.values())) != 1:
        raise IdxError(f"{root}: train and test images differ in size {shapes}")
    return out


def _fit(img: np.ndarray, size: int, mode: str) -> np.ndarray:
    h, w = img.shape
    if (h, w) == (size, size):
        return img
    if mode == "pad":
        if size < h or size < w:
            raise ValueError(f"cannot pad {h}x{w} images to {size}")
        top, left = (size - h) // 2, (size - w) // 2
        out = np.zeros((size, size), np.uint8)
        out[top:top + h, left:left + w] = img
        return out
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


class FashionMnistSource:
    name = "fashion_mnist"
    channels = 1

    def __init__(self, cfg: FashionMnistConfig, image_size: int = 28, seed: int = 0):
        self.cfg, self.image_size, self.seed = cfg, image_size, seed
        data = load_fashion_mnist(cfg.root)  # fails here, before any shard is written
        train_x, train_y = data["train"]
        if cfg.val_size >= train_x.shape[0]:
            raise IdxError(f"fashion_mnist.val_size {cfg.val_size} >= train size {train_x.shape[0]}")
        perm = rng_for(seed, "val-carve").permutation(train_x.shape[0])
        val_idx = np.sort(perm[:cfg.val_size])
        train_idx = np.sort(perm[cfg.val_size:])
        # (images, labels, original index in the published file)
        self._splits = {
            "train": (train_x, train_y, train_idx),
            "val": (train_x, train_y, val_idx),
            "test": (data["test"][0], data["test"][1], np.arange(data["test"][0].shape[0])),
        }

    def splits(self) -> list[str]:
        return ["train", "val", "test"]

    def num_samples(self, split: str) -> int:
        return int(self._splits[split][2].shape[0])

    def iter_split(self, split: str) -> Iterator[Sample]:
        x, y, idx = self._splits[split]
        for j, i in enumerate(idx.tolist()):
            img = _fit(x[i], self.image_size, self.cfg.fit)
            yield Sample(f"{split}_{j:08d}", img[:, :, None], {"cls": int(y[i])})

    def label_schema(self) -> dict[str, dict]:
        return {"cls": {"num_classes": len(CLASSES), "names": list(CLASSES), "description": "Fashion-MNIST class"}}

    def params(self) -> dict:
        return {"root": str(self.cfg.root), "val_size": self.cfg.val_size, "fit": self.cfg.fit,
                "files": {s: list(f) for s, f in FILES.items()}}

    def skipped(self, split: str) -> dict[str, int]:
        return {}
