"""Loss curve of a pretraining run (matplotlib, Agg; no pyplot state).

Top: loss per logged step (log scale when positive) with the learning rate on a twin axis.
Then the collapse signals (target feature std, effective rank) when recorded, and the val
top-1 of probes along training (kNN, linear) when `probes` rows are given.
Accepts a `LossHistory`, a list of row dicts, or the path of the loss CSV (and so for `probes`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from matplotlib.figure import Figure

from ijepa.atomic import atomic_path

__all__ = ["plot_loss_curve", "save_loss_curve_png"]


def _rows(history: Any) -> list[Mapping[str, Any]]:
    if isinstance(history, (str, Path)):
        from ijepa.monitor import LossHistory

        return LossHistory.read_csv(history)
    rows = getattr(history, "rows", history)
    return list(rows)


def _series(rows: Iterable[Mapping[str, Any]], name: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(name)
        if v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            xs.append(float(r["step"]))
            ys.append(v)
    return xs, ys


def plot_loss_curve(history: Any, title: str = "I-JEPA pretraining", probes: Any = None) -> Figure:
    rows = _rows(history)
    probe_rows = _rows(probes) if probes is not None else []
    has_collapse = any(r.get("effective_rank") not in (None, "") and math.isfinite(float(r["effective_rank"]))
                       for r in rows)
    n = 1 + int(has_collapse) + int(bool(probe_rows))
    fig = Figure(figsize=(7.5, 3.8 + 2.2 * (n - 1)), layout="constrained")
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    xs, ys = _series(rows, "loss")
    ax.plot(xs, ys, color="#1f77b4", lw=1.4, label="loss")
    if ys and min(ys) > 0:
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lx, ly = _series(rows, "lr")
    if ly:
        ax2 = ax.twinx()
        ax2.plot(lx, ly, color="#ff7f0e", lw=1.0, ls="--", label="lr")
        ax2.set_ylabel("learning rate", color="#ff7f0e")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if has_collapse:
        bx = axes[1]
        sx, sy = _series(rows, "target_std")
        rx, ry = _series(rows, "effective_rank")
        bx.plot(rx, ry, color="#2ca02c", lw=1.2, label="effective rank")
        bx.set_ylabel("effective rank", color="#2ca02c")
        bx.grid(alpha=0.3)
        if sy:
            bx2 = bx.twinx()
            bx2.plot(sx, sy, color="#d62728", lw=1.0, label="target std")
            bx2.set_ylabel("target feature std", color="#d62728")
    if probe_rows:
        px = axes[-1]
        for name, label, color in (("knn_top1", "kNN", "#9467bd"), ("linear_top1", "linear", "#8c564b")):
            xs, ys = _series(probe_rows, name)
            if ys:
                px.plot(xs, ys, color=color, lw=1.2, marker="o", ms=3, label=label)
        px.set_ylabel("val top-1")
        px.grid(alpha=0.3)
        px.legend(loc="lower right", fontsize=8)
    axes[-1].set_xlabel("step")
    return fig


def save_loss_curve_png(history: Any, path: str | Path, title: str = "I-JEPA pretraining", dpi: int = 110,
                        probes: Any = None) -> Path:
    """Plot and write the PNG atomically; returns the path."""
    fig = plot_loss_curve(history, title, probes)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)
