"""A grid of sample images with their labels as titles (matplotlib, Agg; no pyplot state).

Accepts what the data library produces: `ShardResult.preview` ((key, HxWxC uint8, labels)
triples), or images ([N, C, H, W] / [N, H, W, C] / [N, H, W], uint8 or float in [0, 1],
torch or numpy) plus an optional label mapping {name: sequence of N ints} and class names.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from ijepa.atomic import atomic_path
from ijepa.viz.arrays import as_numpy

__all__ = ["plot_samples", "save_samples_png", "save_figure_png"]


_np = as_numpy


def _hwc(img: np.ndarray) -> np.ndarray:
    """One image -> HxWxC: [C, H, W] when the first axis is 1 or 3 (the project's convention), else HxW(xC)."""
    if img.ndim == 2:
        return img[:, :, None]
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[2] not in (1, 3):
        return np.moveaxis(img, 0, -1)
    return img


def _label_text(labels: Mapping[str, Any], names: Mapping[str, Sequence[str]] | None) -> str:
    parts = []
    for k, v in labels.items():
        v = int(v)
        nm = (names or {}).get(k)
        shown = nm[v] if nm is not None and 0 <= v < len(nm) and nm[v] != str(v) else str(v)
        parts.append(f"{k}={shown}")
    return "\n".join(parts)


def plot_samples(samples: Any, labels: Mapping[str, Sequence[int]] | None = None, *, n: int = 16,
                 ncols: int | None = None, class_names: Mapping[str, Sequence[str]] | None = None,
                 keys: Sequence[str] | None = None, title: str | None = None, cell: float = 1.6) -> Figure:
    """Figure with up to `n` images in a grid, each titled with its labels (and key when given).

    samples: a list of (key, image, labels) triples (ShardResult.preview), or an image batch.
    labels: {name: ints} for an image batch. class_names: {label: names}, e.g. from the
    manifest's label schema ({k: v["names"] for k, v in manifest["labels"].items()}).
    """
    items: list[tuple[str | None, np.ndarray, dict[str, Any]]] = []
    if isinstance(samples, (list, tuple)) and samples and isinstance(samples[0], tuple) and len(samples[0]) == 3:
        for key, img, lab in list(samples)[:n]:
            items.append((key, _np(img), dict(lab or {})))
    else:
        arr = _np(samples)
        if arr.ndim == 3:  # [N, H, W]
            arr = arr[:, None]
        for i in range(min(n, arr.shape[0])):
            lab = {k: _np(v)[i] for k, v in (labels or {}).items()}
            items.append((keys[i] if keys is not None else None, arr[i], lab))
    count = max(1, len(items))
    ncols = ncols or min(8, count)
    nrows = math.ceil(count / ncols)
    lines = max([len(lab) + (1 if key is not None and len(items) <= 16 else 0) for key, _, lab in items] + [1])
    fig = Figure(figsize=(cell * ncols, (cell + 0.13 * lines + 0.1) * nrows + (0.4 if title else 0)))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, (key, img, lab) in zip(axes.ravel(), items):
        im = _hwc(img)
        if im.dtype != np.uint8:
            im = np.clip(im.astype(np.float32), 0.0, 1.0)
        if im.shape[2] == 1:
            ax.imshow(im[:, :, 0], cmap="gray", vmin=0, vmax=255 if im.dtype == np.uint8 else 1.0,
                      interpolation="nearest")
        else:
            ax.imshow(im, interpolation="nearest")
        text = _label_text(lab, class_names)
        if key is not None and len(items) <= 16:
            text = f"{key}\n{text}" if text else key
        ax.set_title(text, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_figure_png(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write `fig` as a PNG atomically; returns the path."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    os.chmod(path, 0o644)
    return Path(path)


def save_samples_png(samples: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """`plot_samples(samples, **kwargs)` saved as a PNG at `path` (atomically)."""
    return save_figure_png(plot_samples(samples, **kwargs), path)
