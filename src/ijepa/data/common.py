"""Shared pieces of the data sources: the sample type, the source interface, seeding, encoding."""
from __future__ import annotations

import io
import zlib
from typing import Any, Iterator, NamedTuple, Protocol

import numpy as np

__all__ = ["Sample", "Source", "split_code", "rng_for", "encode_image", "decode_image_bytes", "to_hwc"]


class Sample(NamedTuple):
    """One image of a source: `key` (unique within the split, no dots), uint8 HxWxC image, int labels."""

    key: str
    image: np.ndarray
    labels: dict[str, int]
    extra: dict[str, Any] | None = None  # small JSON-able metadata (e.g. the source file); stored as `json`


class Source(Protocol):
    """What `shard_dataset` needs from a source."""

    name: str
    channels: int
    image_size: int

    def splits(self) -> list[str]: ...

    def num_samples(self, split: str) -> int: ...  # upper bound (before skipping unreadable inputs)

    def iter_split(self, split: str) -> Iterator[Sample]: ...

    def label_schema(self) -> dict[str, dict[str, Any]]: ...

    def params(self) -> dict[str, Any]: ...

    def skipped(self, split: str) -> dict[str, int]: ...


def split_code(split: str) -> int:
    """A stable integer for a split name (crc32), used in seeds so splits draw independently."""
    return zlib.crc32(split.encode("utf-8"))


def rng_for(*parts: int | str) -> np.random.Generator:
    """numpy Generator seeded from integers/strings, e.g. rng_for(seed, "train", index)."""
    ints = [split_code(p) if isinstance(p, str) else int(p) for p in parts]
    return np.random.default_rng(ints)


def encode_image(img: np.ndarray, fmt: str = "png", jpeg_quality: int = 95, png_compress_level: int = 6) -> bytes:
    """uint8 HxW, HxWx1 or HxWx3 -> PNG or JPEG bytes (no timestamps or other varying metadata)."""
    from PIL import Image

    arr = np.ascontiguousarray(img)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    im = Image.fromarray(arr)  # uint8 HxW -> "L", HxWx3 -> "RGB"
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=png_compress_level)
    elif fmt in ("jpg", "jpeg"):
        im.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
    else:
        raise ValueError(f"unknown image format {fmt!r} (png or jpg)")
    return buf.getvalue()


def decode_image_bytes(data: bytes, channels: int) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 HxWxC (C = channels: 1 grey, 3 RGB)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def to_hwc(img: np.ndarray) -> np.ndarray:
    """HxW -> HxWx1; HxWxC unchanged."""
    return img[:, :, None] if img.ndim == 2 else img
