"""Probe figures (matplotlib, Agg; no pyplot state): I-JEPA vs baselines per probe, confusion matrix.

`plot_probe_bars(metrics)` takes the `metrics` dict of `ijepa.probes.run_probes`: one panel per
label (cls, count, depth), in it one group of bars per probe family (linear, low-shot,
attentive, kNN) side by side, one bar per model; low-shot bars carry error bars of the std
over seeds. `plot_confusion(confusion, class_names)` takes
its `extras["confusion"]` / `extras["class_names"]`.
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from ijepa.viz.masks import save_figure_png

__all__ = ["plot_probe_bars", "plot_confusion", "save_figure_png", "save_probe_pngs", "family_and_label"]

_MODEL_COLOURS = {"ijepa": "#4363d8", "random_init": "#a9a9a9", "pixels": "#f58231"}
_FAMILY_TITLES = {"linear": "linear", "lowshot": "low-shot", "attentive": "attentive", "knn": "kNN"}
_LABEL_TITLES = {"cls": "class (cls)", "count": "count", "depth": "depth"}
_NOT_MODELS = {"n_labels", "seeds"}


def family_and_label(probe: str) -> tuple[str, str]:
    """`linear` -> (linear, cls), `lowshot` -> (lowshot, cls), `count` -> (linear, count),
    `attentive_depth` -> (attentive, depth), `knn_cls` -> (knn, cls); others -> (probe, probe)."""
    fixed = {"linear": ("linear", "cls"), "lowshot": ("lowshot", "cls"), "count": ("linear", "count"),
             "depth": ("linear", "depth")}
    if probe in fixed:
        return fixed[probe]
    family, _, label = probe.partition("_")
    return (family, label) if family in ("attentive", "knn") and label else (probe, probe)


def _models(probes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    seen: list[str] = []
    for row in probes.values():
        for k in row:
            if k not in _NOT_MODELS and not k.endswith("_std") and k not in seen:
                seen.append(k)
    return sorted(seen, key=lambda m: (list(_MODEL_COLOURS).index(m) if m in _MODEL_COLOURS else 99, m))


def plot_probe_bars(metrics: Mapping[str, Any], title: str | None = None) -> Figure:
    """Panels per label, grouped bars per probe family, one bar per model (top-1 in %), std error bars."""
    probes = metrics.get("probes") or {}
    skipped = metrics.get("skipped") or {}
    models = _models(probes)
    panels: dict[str, list[str]] = {}
    for p in probes:
        panels.setdefault(family_and_label(p)[1], []).append(p)
    widths = [max(1, len(names)) for names in panels.values()] or [1]
    fig = Figure(figsize=(max(4.0, 1.5 * sum(widths) + 1.5), 3.9), dpi=100)
    axes = fig.subplots(1, len(widths), squeeze=False, sharey=True,
                        gridspec_kw={"width_ratios": widths})[0]
    width = 0.8 / max(1, len(models))
    for ax, (label, names) in zip(axes, panels.items()):
        x = np.arange(len(names))
        for j, model in enumerate(models):
            vals = [100.0 * probes[p][model] if model in probes[p] else np.nan for p in names]
            errs = [100.0 * probes[p].get(f"{model}_std", 0.0) if model in probes[p] else 0.0 for p in names]
            pos = x - 0.4 + width * (j + 0.5)
            bars = ax.bar(pos, vals, width, yerr=errs if any(errs) else None, capsize=3,
                          color=_MODEL_COLOURS.get(model, f"C{j}"), label=model)
            for rect, v in zip(bars, vals):
                if np.isfinite(v):
                    ax.annotate(f"{v:.1f}", (rect.get_x() + rect.get_width() / 2, v), xytext=(0, 2),
                                textcoords="offset points", ha="center", va="bottom", fontsize=6, rotation=90)
        ticks = []
        for p in names:
            family = family_and_label(p)[0]
            n = probes[p].get("n_labels")
            extra = f"\n{n} labels" if n is not None else ""
            if p == "lowshot" and probes[p].get("seeds"):
                extra += f", {probes[p]['seeds']} seeds"
            ticks.append(_FAMILY_TITLES.get(family, family) + extra)
        ax.set_xticks(x, ticks, fontsize=7)
        ax.set_title(_LABEL_TITLES.get(label, label), fontsize=9)
        ax.set_ylim(0, 120)  # room for the legend and the value labels above the 100% line
        ax.set_yticks(range(0, 101, 20))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test top-1 (%)")
    if models:
        fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="upper right", ncol=len(models),
                   frameon=False)
    sha = metrics.get("encoder_sha256")
    heading = (title or "probes: I-JEPA vs baselines") + (f"  [encoder {sha[:12]}]" if sha else "")
    if skipped:
        heading += "\n" + textwrap.fill("skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()),
                                        width=int(fig.get_figwidth() * 13))
    fig.suptitle(heading, fontsize=8, x=0.02, ha="left")
    fig.tight_layout()
    return fig


def plot_confusion(confusion: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str] | None = None,
                   normalize: bool = True, title: str | None = None) -> Figure:
    """Confusion matrix (row = true class, column = predicted); rows normalised to 1 by default."""
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}x{k} confusion matrix")
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1.0) if normalize else cm
    size = min(12.0, 2.5 + 0.45 * k)
    fig = Figure(figsize=(size + 1.0, size), dpi=100)
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if k <= 20:
        hi = np.nanmax(shown) if shown.size else 1.0
        for i in range(k):
            for j in range(k):
                v = shown[i, j]
                txt = f"{v:.2f}" if normalize else f"{int(v)}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=6 if k > 10 else 7,
                        color="white" if v > 0.6 * hi else "black")
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(cm) / cm.sum() if cm.sum() else float("nan")
    ax.set_title((title or "linear probe confusion (test)") + f", top-1 {100 * acc:.1f}%", fontsize=9)
    fig.tight_layout()
    return fig


def save_probe_pngs(metrics: Mapping[str, Any], extras: Mapping[str, Any] | None,
                    out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write `probes.png` (bars) and, when available, `confusion.png` into `out_dir` atomically."""
    out = Path(out_dir)
    written = {"bars": save_figure_png(plot_probe_bars(metrics), out / "probes.png")}
    if extras and extras.get("confusion") is not None:
        written["confusion"] = save_figure_png(plot_confusion(extras["confusion"], extras.get("class_names")),
                                               out / "confusion.png")
    return written
