"""What the predictor predicts, as a figure (matplotlib, Agg; no pyplot state).

One row per image, one column per panel (`COLUMNS`): the image; the context encoder's view
(every patch outside the context greyed out); the target blocks (their true pixels, the rest
grey); the decoded target-encoder features of the target blocks; the decoded predictions of
those blocks. Target blocks are outlined in every panel but the first. The panels are
computed by `ijepa.predictions`; this module only lays them out.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ijepa.viz.arrays import as_numpy
from ijepa.viz.masks import _to_hwc01

__all__ = ["COLUMNS", "plot_predictions", "plot_skipped"]

COLUMNS = ("image", "context", "target blocks", "decoded target features", "decoded predictions")


def plot_predictions(panels: Sequence[Any], target_mask: Any, grid: tuple[int, int],
                     title: str | None = None) -> Figure:
    """`panels`: one [n, C, H, W] array in [0, 1] per entry of `COLUMNS` (torch or numpy);
    `target_mask`: bool [n, gh * gw], the patches covered by any target block (outlined)."""
    if len(panels) != len(COLUMNS):
        raise ValueError(f"expected {len(COLUMNS)} panels ({', '.join(COLUMNS)}), got {len(panels)}")
    arrays = [as_numpy(p) for p in panels]
    n = arrays[0].shape[0]
    if any(a.shape != arrays[0].shape for a in arrays) or arrays[0].ndim != 4:
        raise ValueError(f"panels must share one shape [n, C, H, W], got {[a.shape for a in arrays]}")
    gh, gw = grid
    tmask = as_numpy(target_mask).astype(bool).reshape(n, gh, gw)
    fig = Figure(figsize=(2.0 * len(COLUMNS), 2.0 * n + 0.6), dpi=100)
    axes = fig.subplots(n, len(COLUMNS), squeeze=False)
    extent = (0, gw, gh, 0)  # patch coordinates: patch (r, c) is the unit square at (c, r)
    for i in range(n):
        for j, name in enumerate(COLUMNS):
            ax = axes[i, j]
            # values are in [0, 1] already: clip, never stretch (stretching would hide decoder errors)
            ax.imshow(_to_hwc01(np.clip(arrays[j][i].astype(np.float32), 0.0, 1.0)), extent=extent,
                      interpolation="nearest")
            if j > 0:
                for r, c in zip(*np.nonzero(tmask[i])):
                    ax.add_patch(Rectangle((c, r), 1, 1, fill=False, edgecolor="#ffd400", lw=0.5, alpha=0.7))
            ax.set_xlim(0, gw)
            ax.set_ylim(gh, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(title or "what the predictor predicts", fontsize=10)
    fig.tight_layout()
    return fig


def plot_skipped(reason: str) -> Figure:
    """A placeholder figure saying why no predictions were visualised (e.g. the MAE baseline)."""
    fig = Figure(figsize=(6, 1.5), dpi=100)
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, f"predictor visualisation skipped:\n{reason}", ha="center", va="center", fontsize=10,
            wrap=True)
    return fig
