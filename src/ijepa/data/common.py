"""Shared pieces of the data sources: the sample type, the source interface, encoding.

Seeding (`rng_for`) lives in ijepa.seeding with the project's other seed mixers."""
from __future__ import annotations

import io
from typing import Any, Iterator, NamedTuple, Protocol

import numpy as np

__all__ = ["Sample", "Source", "encode_image"]


class Sample(NamedTuple):
    """One image of a source: `key` (unique within the split, no dots), uint8 HxWxC image, int labels."""

    key: str
    image: np.ndarray
    labels: dict[str, int]
    extra: dict[str, Any] | None = None  # small JSON-able metadata (e.g. the source file); stored as `json`
    encoded: tuple[str, bytes] | None = None  # (extension, bytes) stored as they are; `image` may then be None


class Source(Protocol):
    """What `shard_dataset` needs from a source."""

    name: str
    channels: int
    image_size: int

    def splits(self) -> list[str]: ...

    def num_samples(self, split: str) -> int: ...  # upper bound (before skipping unreadable inputs)

    def iter_split(self, split: str) -> Iterator[Sample]: ...  # sources with `parallel` take mapper=

    def label_schema(self) -> dict[str, dict[str, Any]]: ...

    def params(self) -> dict[str, Any]: ...

    def skipped(self, split: str) -> dict[str, int]: ...


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
