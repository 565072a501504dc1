"""Sample multi-block masks drawn over their images (matplotlib, Agg; no pyplot state).

Top row: the image with every patch outside the context dimmed (context patches shown
bright, outlined). Bottom row: the image with each target block filled and outlined in its
own colour. Works for grey (C=1) and RGB images, uint8 or float, [B, C, H, W] or
[B, H, W, C] or [B, H, W], torch or numpy.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ijepa.atomic import atomic_path
from ijepa.viz.arrays import as_numpy

__all__ = ["plot_masks", "save_figure_png", "save_masks_png"]

_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
            "#bfef45", "#fabed4", "#469990"]


_as_numpy = as_numpy


def _to_hwc01(img: np.ndarray) -> np.ndarray:
    """One image -> float [H, W, 3] in [0, 1]."""
    if img.ndim == 2:
        img = img[..., None]
    elif img.ndim == 3 and img.shape[0] in (1, 3):
        img = np.moveaxis(img, 0, -1)  # C, H, W (the project's convention, also when ambiguous)
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"expected a grey or RGB image, got shape {img.shape}")
    if img.dtype == np.uint8:
        out = img.astype(np.float32) / 255.0
    else:
        out = img.astype(np.float32)
        lo, hi = float(np.nanmin(out)), float(np.nanmax(out))
        if lo < 0.0 or hi > 1.0:  # e.g. normalised inputs: stretch to [0, 1] for display
            out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return np.clip(out, 0.0, 1.0)


def plot_masks(images: Any, masks: Any, n: int = 4, dim: float = 0.7,
               title: str | None = None) -> Figure:
    """Figure with the first `n` images of a batch and their masks (see module docstring).

    `masks` is an `ijepa.masks.Masks` (context [nenc, B, Nc], targets [npred, B, Nt], grid).
    """
    imgs = _as_numpy(images)
    if imgs.ndim not in (3, 4):
        raise ValueError(f"expected a batch of images [B, C, H, W] / [B, H, W(, C)], got {imgs.shape}")
    gh, gw = masks.grid
    ctx = _as_numpy(masks.context)
    tgt = _as_numpy(masks.targets)
    n = max(1, min(n, imgs.shape[0], ctx.shape[1]))
    fig = Figure(figsize=(2.6 * n, 5.8), dpi=100)
    axes = fig.subplots(2, n, squeeze=False)
    extent = (0, gw, gh, 0)  # image drawn in patch coordinates: patch (r, c) = unit square
    for i in range(n):
        img = _to_hwc01(imgs[i])
        # context: dim every patch outside the (union of the) context lists
        keep = np.zeros(gh * gw, dtype=bool)
        valid = getattr(masks, "context_valid", None)
        kept = ctx[:, i] if valid is None else ctx[:, i][_as_numpy(valid)[:, i].astype(bool)]
        keep[kept.reshape(-1)] = True  # padding ("pad" policy) is not context
        shade = np.zeros((gh, gw, 4), dtype=np.float32)
        shade[..., 3] = np.where(keep.reshape(gh, gw), 0.0, dim)
        ax = axes[0, i]
        ax.imshow(img, extent=extent, interpolation="nearest")
        ax.imshow(shade, extent=extent, interpolation="nearest")
        for r, c in zip(*np.nonzero(keep.reshape(gh, gw))):
            ax.add_patch(Rectangle((c, r), 1, 1, fill=False, edgecolor="#ffd400", lw=0.4, alpha=0.6))
        counts = getattr(masks, "context_counts", None)
        if valid is not None:  # every context patch kept, lists padded to the batch's longest
            ax.set_title(f"context {int(keep.sum())}/{gh * gw} (padded to {ctx.shape[-1]})", fontsize=8)
        else:
            full = f", {int(_as_numpy(counts)[:, i].min())} before cut" if counts is not None else ""
            ax.set_title(f"context {ctx.shape[-1]}/{gh * gw}{full}", fontsize=8)
        # targets: one colour per block
        ax = axes[1, i]
        ax.imshow(img * (1.0 - 0.35 * dim), extent=extent, interpolation="nearest")
        for k in range(tgt.shape[0]):
            idx = tgt[k, i]
            rr, cc = idx // gw, idx % gw
            col = _COLOURS[k % len(_COLOURS)]
            xy, w, h = (cc.min(), rr.min()), cc.max() - cc.min() + 1, rr.max() - rr.min() + 1
            ax.add_patch(Rectangle(xy, w, h, facecolor=col, alpha=0.35, edgecolor="none"))
            ax.add_patch(Rectangle(xy, w, h, fill=False, edgecolor=col, lw=2.0))
        ax.set_title(f"{tgt.shape[0]} targets of {tgt.shape[-1]}", fontsize=8)
    for ax in axes.flat:
        ax.set_xlim(0, gw)
        ax.set_ylim(gh, 0)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"multi-block masks, grid {gh}x{gw}", fontsize=10)
    fig.tight_layout()
    return fig


def save_figure_png(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write `fig` as a PNG atomically; returns the path."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def save_masks_png(images: Any, masks: Any, path: str | os.PathLike, n: int = 4, **kwargs) -> Path:
    """`plot_masks(images, masks, n, **kwargs)` saved as a PNG at `path`."""
    return save_figure_png(plot_masks(images, masks, n=n, **kwargs), path)
