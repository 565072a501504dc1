"""Typed configuration of the data stage (sources + sharding), validated before any work.

Build from plain parameters with ``from_mapping(ShardConfig, params)``; every range or
cross-field problem raises ``ConfigError`` naming the field (``ShardConfig.image_size``,
``ShardConfig.scenes.sizes.train``, ...).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from ijepa.config import ConfigError, require

__all__ = ["ShardConfig", "ScenesConfig", "FashionMnistConfig", "ImageFolderConfig", "SOURCES",
           "DEFAULT_IMAGE_SIZE", "FASHION_MNIST_DIR", "SPLIT_NAME"]

SOURCES = ("scenes", "fashion_mnist", "imagefolder")
DEFAULT_IMAGE_SIZE = {"scenes": 64, "fashion_mnist": 28, "imagefolder": 64}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")  # split names end up in shard file names


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class ScenesConfig:
    """Procedural CLEVR-like scenes (`ijepa.data.scenes`).

    sizes: images per split (splits are written in this order).
    min_objects / max_objects: the number of objects drawn per image is uniform in this
        range before placement; objects that cannot be placed visibly are dropped, and an
        image is re-drawn until at least `min_objects` are visible.
    depth_bins: bins of the closest object's distance for the `depth` label (0 = nearest).
    """

    sizes: dict[str, int] = field(default_factory=lambda: {"train": 10000, "val": 2000, "test": 2000})
    min_objects: int = 3
    max_objects: int = 10
    depth_bins: int = 6

    def validate(self) -> None:
        require(isinstance(self.sizes, dict) and len(self.sizes) > 0,
                f"sizes must be a non-empty mapping split -> count, got {self.sizes!r}")
        for split, n in self.sizes.items():
            require(isinstance(split, str) and SPLIT_NAME.match(split) is not None,
                    f"sizes: split name {split!r} must be letters, digits or '_'")
            require(_is_int(n), f"sizes.{split} must be an integer, got {n!r}")
            require(n >= 0, f"sizes.{split} must be >= 0, got {n}")
        require(_is_int(self.min_objects) and self.min_objects >= 1,
                f"min_objects must be an integer >= 1, got {self.min_objects!r}")
        require(_is_int(self.max_objects) and self.max_objects >= self.min_objects,
                f"max_objects must be an integer >= min_objects ({self.min_objects}), got {self.max_objects!r}")
        require(self.max_objects <= 20, f"max_objects must be <= 20, got {self.max_objects}")
        require(_is_int(self.depth_bins) and 1 <= self.depth_bins <= 32,
                f"depth_bins must be an integer in [1, 32], got {self.depth_bins!r}")


@dataclass(frozen=True)
class FashionMnistConfig:
    """Fashion-MNIST from the four idx files (`ijepa.data.fashion_mnist`).

    root: folder with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
        t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (or the same without .gz).
    val_size: images carved from the published train split (seeded permutation) as `val`.
    fit: how 28x28 reaches `image_size`: "pad" (zero border, pixels unchanged; needs
        image_size >= 28) or "resize" (bicubic).
    """

    root: str = FASHION_MNIST_DIR
    val_size: int = 5000
    fit: Literal["pad", "resize"] = "pad"

    def validate(self) -> None:
        require(isinstance(self.root, str) and self.root != "", "root must be a non-empty path")
        require(_is_int(self.val_size) and 0 <= self.val_size < 60000,
                f"val_size must be an integer in [0, 60000), got {self.val_size!r}")
        require(self.fit in ("pad", "resize"), f"fit must be 'pad' or 'resize', got {self.fit!r}")


@dataclass(frozen=True)
class ImageFolderConfig:
    """Any folder of images, class = first-level sub-folder (`ijepa.data.imagefolder`).

    root: root/<class>/<image...>, or root/{train,val,test}/<class>/<image...>; a folder
        without sub-folders gives an unlabelled dataset. Splits missing from the layout are
        carved from train by the fractions below (per class, seeded).
    max_warnings: how many skipped files are named in the log warning.
    store: "photo" (default) keeps each photo whole (ijepa.data.photos): JPEGs with the longer
        side <= max_side as their original bytes, larger ones resized to max_side and written
        as JPEG (ShardConfig.jpeg_quality), other formats as PNG; the square crop happens at
        training time (RandomResizedCrop) and for probes (resize + centre crop).
        "square": the shorter side resized to image_size and centre-cropped at sharding time,
        encoded as ShardConfig.format.
    max_side: the longest side a stored photo keeps (store: photo).
    """

    root: str = ""
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    max_warnings: int = 5
    store: Literal["photo", "square"] = "photo"
    max_side: int = 512

    def validate(self) -> None:
        require(isinstance(self.root, str), f"root must be a path string, got {self.root!r}")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            require(_is_num(v) and 0.0 <= v < 1.0, f"{name} must be a number in [0, 1), got {v!r}")
        require(self.val_fraction + self.test_fraction < 1.0,
                f"val_fraction + test_fraction must be < 1, got {self.val_fraction + self.test_fraction}")
        require(_is_int(self.max_warnings) and self.max_warnings >= 0,
                f"max_warnings must be an integer >= 0, got {self.max_warnings!r}")
        require(self.store in ("photo", "square"), f"store must be 'photo' or 'square', got {self.store!r}")
        require(_is_int(self.max_side) and 16 <= self.max_side <= 16384,
                f"max_side must be an integer in [16, 16384], got {self.max_side!r}")


@dataclass(frozen=True)
class ShardConfig:
    """What `shard_dataset` writes.

    source: which source produces the images.
    dataset: name recorded in the manifest ("" = the source name).
    image_size: stored square size in pixels (None = the source's default: scenes 64,
        fashion_mnist 28, imagefolder 64).
    seed: every random choice (scene content, val carving, split order) derives from it.
    format / jpeg_quality / png_compress_level: image encoding inside the tars (png is
        lossless; both are deterministic for fixed library versions).
    maxcount / maxsize: samples / bytes per shard before a new shard starts.
    max_samples: optional cap per split name (e.g. {"train": 1000}) for quick runs.
    preview: how many samples of the first split `ShardResult.preview` keeps.
    workers: processes that read/render and encode inputs (null = every core; 1 = none, in the
        calling process). The output is byte-identical for any number.
    """

    source: Literal["scenes", "fashion_mnist", "imagefolder"] = "scenes"
    dataset: str = ""
    image_size: int | None = None
    seed: int = 0
    format: Literal["png", "jpg"] = "png"
    jpeg_quality: int = 95
    png_compress_level: int = 6
    maxcount: int = 10000
    maxsize: int = 1 << 30
    max_samples: dict[str, int] = field(default_factory=dict)
    preview: int = 16
    workers: int | None = None
    scenes: ScenesConfig = field(default_factory=ScenesConfig)
    fashion_mnist: FashionMnistConfig = field(default_factory=FashionMnistConfig)
    imagefolder: ImageFolderConfig = field(default_factory=ImageFolderConfig)

    @property
    def name(self) -> str:
        return self.dataset or self.source

    @property
    def size(self) -> int:
        return self.image_size if self.image_size is not None else DEFAULT_IMAGE_SIZE[self.source]

    def validate(self) -> None:
        require(self.source in SOURCES, f"source must be one of {list(SOURCES)}, got {self.source!r}")
        require(isinstance(self.dataset, str) and (self.dataset == "" or SPLIT_NAME.match(self.dataset) is not None),
                f"dataset must be letters, digits or '_', got {self.dataset!r}")
        require(self.image_size is None or _is_int(self.image_size),
                f"image_size must be an integer, got {self.image_size!r}")
        require(self.image_size is None or 4 <= self.image_size <= 4096,
                f"image_size must be in [4, 4096], got {self.image_size!r}")
        require(_is_int(self.seed) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        require(self.format in ("png", "jpg"), f"format must be 'png' or 'jpg', got {self.format!r}")
        require(_is_int(self.jpeg_quality) and 1 <= self.jpeg_quality <= 100,
                f"jpeg_quality must be an integer in [1, 100], got {self.jpeg_quality!r}")
        require(_is_int(self.png_compress_level) and 0 <= self.png_compress_level <= 9,
                f"png_compress_level must be an integer in [0, 9], got {self.png_compress_level!r}")
        require(_is_int(self.maxcount) and self.maxcount >= 1, f"maxcount must be an integer >= 1, got {self.maxcount!r}")
        require(_is_int(self.maxsize) and self.maxsize >= 1, f"maxsize must be an integer >= 1, got {self.maxsize!r}")
        require(isinstance(self.max_samples, dict), f"max_samples must be a mapping, got {self.max_samples!r}")
        for split, n in self.max_samples.items():
            require(_is_int(n) and n >= 0, f"max_samples.{split} must be an integer >= 0, got {n!r}")
        require(_is_int(self.preview) and self.preview >= 0, f"preview must be an integer >= 0, got {self.preview!r}")
        require(self.workers is None or (_is_int(self.workers) and self.workers >= 1),
                f"workers must be an integer >= 1 or null, got {self.workers!r}")
        for name, cls in (("scenes", ScenesConfig), ("fashion_mnist", FashionMnistConfig),
                          ("imagefolder", ImageFolderConfig)):
            sub = getattr(self, name)
            require(isinstance(sub, cls), f"{name} must be a {cls.__name__}, got {sub!r}")
            try:
                sub.validate()
            except ConfigError as err:
                raise ConfigError(f"{name}.{err}") from None
        if self.source == "imagefolder":
            require(self.imagefolder.root != "", "imagefolder.root is required when source is 'imagefolder'")
        if self.source == "fashion_mnist" and self.fashion_mnist.fit == "pad":
            require(self.size >= 28, f"image_size must be >= 28 with fashion_mnist.fit 'pad', got {self.size}")
