"""Any folder of images (ImageNet layout): class = first-level sub-folder.

Layouts:
- ``root/<class>/<image...>``: val and test are carved from each class by
  `val_fraction` / `test_fraction` (a permutation seeded from (seed, "carve", class)).
- ``root/{train,val,test}/<class>/<image...>``: the splits as given; a split missing from
  the layout is carved from train as above. Class indices are the sorted union of the
  class folders of all splits.
- ``root/<image>`` (no sub-folders): one unlabelled set, carved the same way.

Every regular, non-hidden file is tried, in worker processes when the shard writer passes a
parallel `mapper` (the order of the output does not depend on it). ``store: photo`` (default)
keeps each photo whole (`ijepa.data.photos.encode_photo`: original JPEG bytes up to
`max_side`, else resized); ``store: square`` converts to RGB after EXIF orientation
(``ImageOps.exif_transpose``), resizes so the shorter side is `image_size` (bicubic; JPEGs are
first decoded at a reduced scale with ``draft``, still >= the target) and centre-crops. Files
that cannot be used are skipped and counted by reason:
``empty_file``, ``not_an_image``, ``truncated``, ``too_large`` (decompression bomb),
``corrupt`` (any other decoding error), ``outside_class_folder`` (a file directly in a
root that has class folders); the first few are named in one logging warning per split.
Each split's order is a permutation seeded from (seed, split), so classes are mixed
inside the shards.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ijepa.data.common import Sample
from ijepa.data.config import ImageFolderConfig
from ijepa.data.photos import READ_ERRORS, SkipImage, classify_error, encode_photo, open_rgb
from ijepa.seeding import rng_for

__all__ = ["ImageFolderError", "ImageFolderSource", "load_image", "SPLIT_DIRS", "SKIP_REASONS", "SkipImage"]

log = logging.getLogger(__name__)

SPLIT_DIRS = ("train", "val", "test")
SKIP_REASONS = ("empty_file", "not_an_image", "truncated", "too_large", "corrupt", "outside_class_folder")


class ImageFolderError(FileNotFoundError):
    """The image folder is missing, not a folder, or holds no files (the message names the path)."""


def _files(folder: Path) -> list[Path]:
    """Regular non-hidden files under `folder`, recursively, in sorted order (hidden folders skipped)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return sorted(out)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_image(path: str | Path, size: int) -> np.ndarray:
    """One file -> uint8 [size, size, 3] (EXIF orientation, RGB, shorter side resize, centre crop).

    Raises SkipImage(reason, detail) for a file that cannot be used."""
    from PIL import Image, ImageOps

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise SkipImage("empty_file", "0 bytes")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette transparency, EXIF oddities
            with Image.open(path) as im:
                im.draft("RGB", (size, size))
                im = open_rgb(ImageOps.exif_transpose(im))
                w, h = im.size
                if w < 1 or h < 1:
                    raise SkipImage("corrupt", f"size {w}x{h}")
                scale = size / min(w, h)
                nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                if (nw, nh) != (w, h):
                    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
                left, top = (nw - size) // 2, (nh - size) // 2
                im = im.crop((left, top, left + size, top + size))
                arr = np.asarray(im, dtype=np.uint8)
    except SkipImage:
        raise
    except (Image.DecompressionBombError, *READ_ERRORS) as err:
        raise classify_error(err, path) from None
    if arr.shape != (size, size, 3):
        raise SkipImage("corrupt", f"decoded to shape {arr.shape}")
    return arr


class _Load:
    """Picklable per-file work for the shard writer's processes: ("ok", payload) or ("skip", reason, detail)."""

    def __init__(self, store: str, image_size: int, max_side: int, jpeg_quality: int):
        self.store, self.image_size, self.max_side, self.jpeg_quality = store, image_size, max_side, jpeg_quality

    def __call__(self, path: Path) -> tuple:
        try:
            if self.store == "photo":
                ext, data, _ = encode_photo(path, self.max_side, self.jpeg_quality)
                return "ok", (ext, data)
            return "ok", load_image(path, self.image_size)
        except SkipImage as err:
            return "skip", err.reason, err.detail
        except OSError as err:  # e.g. vanished or unreadable between listing and reading
            return "skip", "corrupt", str(err)


class ImageFolderSource:
    name = "imagefolder"
    channels = 3
    parallel = True  # iter_split takes a mapper (the shard writer's process pool)

    def __init__(self, cfg: ImageFolderConfig, image_size: int = 64, seed: int = 0, jpeg_quality: int = 95):
        self.cfg, self.image_size, self.seed, self.jpeg_quality = cfg, image_size, seed, jpeg_quality
        self.root = Path(os.path.expanduser(cfg.root))
        if not cfg.root:
            raise ImageFolderError("imagefolder.root is not set")
        if not self.root.exists():
            raise ImageFolderError(f"image folder not found: {self.root}")
        if not self.root.is_dir():
            raise ImageFolderError(f"image folder is not a directory: {self.root}")
        self._skipped: dict[str, Counter] = {}
        self._pre_skipped: list[tuple[str, Path]] = []
        subdirs = _subdirs(self.root)
        names = {d.name for d in subdirs}
        self.split_layout = "train" in names and names <= set(SPLIT_DIRS)
        lists: dict[str, list[tuple[Path, int]]] = {}
        if self.split_layout:
            trees = {s: self.root / s for s in SPLIT_DIRS if s in names}
            self.classes = sorted({c.name for t in trees.values() for c in _subdirs(t)})
            self.labelled = bool(self.classes)
            for s, t in trees.items():
                lists[s] = self._list_tree(t)
            missing = [s for s in SPLIT_DIRS if s not in lists]
            if missing:
                carved = self._carve(lists["train"], {s: self._fraction(s) for s in missing})
                lists.update(carved)
        else:
            self.classes = [d.name for d in subdirs]
            self.labelled = bool(self.classes)
            lists = self._carve(self._list_tree(self.root), {"val": cfg.val_fraction, "test": cfg.test_fraction})
        if sum(len(v) for v in lists.values()) == 0:
            raise ImageFolderError(f"image folder {self.root} contains no image files"
                                   + (f" (classes {self.classes[:5]})" if self.classes else ""))
        self._lists = {s: self._shuffle(s, lists.get(s, [])) for s in SPLIT_DIRS}

    def _fraction(self, split: str) -> float:
        return {"val": self.cfg.val_fraction, "test": self.cfg.test_fraction}.get(split, 0.0)

    def _list_tree(self, tree: Path) -> list[tuple[Path, int]]:
        """(file, class index or -1) for a tree laid out as tree/<class>/..., or unlabelled files."""
        out = []
        class_dirs = _subdirs(tree)
        if self.labelled:
            index = {c: i for i, c in enumerate(self.classes)}
            for d in class_dirs:
                out.extend((f, index[d.name]) for f in _files(d))
            for f in sorted(p for p in tree.iterdir() if p.is_file() and not p.name.startswith(".")):
                self._pre_skipped.append(("outside_class_folder", f))
        else:
            out.extend((f, -1) for f in _files(tree))
        return out

    def _carve(self, items: list[tuple[Path, int]], fractions: dict[str, float]) -> dict[str, list[tuple[Path, int]]]:
        """Split `items` per class: round(n * fraction) to each carved split, the rest stays train."""
        out: dict[str, list[tuple[Path, int]]] = {"train": []}
        out.update({s: [] for s in fractions})
        by_class: dict[int, list[tuple[Path, int]]] = {}
        for it in items:
            by_class.setdefault(it[1], []).append(it)
        for c in sorted(by_class):
            group = sorted(by_class[c], key=lambda it: str(it[0]))
            name = self.classes[c] if c >= 0 else "(unlabelled)"
            perm = rng_for(self.seed, "carve", name).permutation(len(group))
            start = 0
            for s, frac in fractions.items():
                k = int(round(len(group) * frac))
                out[s].extend(group[i] for i in perm[start:start + k])
                start += k
            out["train"].extend(group[i] for i in perm[start:])
        return out

    def _shuffle(self, split: str, items: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
        items = sorted(items, key=lambda it: str(it[0]))
        perm = rng_for(self.seed, "order", split).permutation(len(items))
        return [items[i] for i in perm]

    # ---------------------------------------------------------------------- Source interface
    def splits(self) -> list[str]:
        return list(SPLIT_DIRS)

    def num_samples(self, split: str) -> int:
        return len(self._lists[split])

    def iter_split(self, split: str, mapper: Callable = map) -> Iterator[Sample]:
        counts: Counter = Counter()
        self._skipped[split] = counts
        named: list[str] = []
        if split == "train":  # files outside class folders are reported once, with train
            for reason, f in self._pre_skipped:
                counts[reason] += 1
                if len(named) < self.cfg.max_warnings:
                    named.append(f"{f} ({reason})")
        j = 0
        try:
            items = self._lists[split]
            work = _Load(self.cfg.store, self.image_size, self.cfg.max_side, self.jpeg_quality)
            for (path, cls), result in zip(items, mapper(work, [p for p, _ in items])):
                if result[0] == "skip":
                    counts[result[1]] += 1
                    if len(named) < self.cfg.max_warnings:
                        named.append(f"{path} ({result[1]}: {result[2]})")
                    continue
                labels = {"cls": cls} if self.labelled else {}
                extra = {"path": path.relative_to(self.root).as_posix()}
                if self.cfg.store == "photo":
                    yield Sample(f"{split}_{j:08d}", None, labels, extra, encoded=result[1])
                else:
                    yield Sample(f"{split}_{j:08d}", result[1], labels, extra)
                j += 1
        finally:  # also when the consumer stops early (max_samples)
            if counts:
                log.warning("imagefolder %s split %s: skipped %d file(s) %s; first: %s", self.root, split,
                            sum(counts.values()), dict(sorted(counts.items())), "; ".join(named))

    def label_schema(self) -> dict[str, dict]:
        if not self.labelled:
            return {}
        return {"cls": {"num_classes": len(self.classes), "names": list(self.classes),
                        "description": "class folder (sorted names)"}}

    def params(self) -> dict:
        return {"root": str(self.root), "layout": "split_folders" if self.split_layout else "class_folders",
                "val_fraction": self.cfg.val_fraction, "test_fraction": self.cfg.test_fraction,
                "store": self.cfg.store, "exif_transpose": True,
                **({"max_side": self.cfg.max_side, "jpeg": "original bytes when the longer side <= max_side, "
                    "else resized (bicubic) to max_side", "other_formats": "png"} if self.cfg.store == "photo"
                   else {"resize": "shorter_side_bicubic_center_crop"})}

    def skipped(self, split: str) -> dict[str, int]:
        return dict(sorted(self._skipped.get(split, {}).items()))
