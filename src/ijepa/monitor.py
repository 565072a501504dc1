"""Training monitors: collapse signals and the loss history (CSV for DVC plots).

Collapse signals are computed on the average-pooled target-encoder features of a batch,
P [B, D] (one vector per image):

- ``target_std``: std over the batch of each feature dimension, averaged over dimensions.
  A collapsed encoder maps every image to (nearly) the same vector: this goes to 0.
- ``effective_rank``: exp(entropy of the singular values of P normalised to sum 1)
  (RankMe, Garrido et al. 2023); between 1 and min(B, D). Collapse to a low-dimensional
  subspace drives it towards 1.

`LossHistory` keeps one row per logged step. Its state is a dict of lists (saved in the
checkpoint), so after a resume the CSV is rewritten from the checkpoint's rows: no step is
duplicated and rows past the checkpoint (logged before a crash) are dropped and redone.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from ijepa import atomic

__all__ = ["collapse_stats", "effective_rank", "LossHistory", "CSV_COLUMNS"]

CSV_COLUMNS = ("step", "epoch", "loss", "lr", "weight_decay", "ema_momentum", "grad_norm",
               "target_std", "effective_rank", "context_tokens", "img_per_s")


def effective_rank(x: torch.Tensor, eps: float = 1e-12) -> float:
    """exp(entropy(s / sum(s))) of the singular values s of x [B, D]."""
    s = torch.linalg.svdvals(x.detach().float())
    total = s.sum()
    if not torch.isfinite(total) or total <= 0:
        return float("nan") if not torch.isfinite(total) else 1.0
    p = s / total
    ent = -(p * torch.log(p.clamp_min(eps))).sum()
    return float(torch.exp(ent))


def collapse_stats(features: torch.Tensor) -> dict[str, float]:
    """Collapse signals of target features [B, N, D] (pooled over N) or [B, D]."""
    f = features.detach().float()
    if f.ndim == 3:
        f = f.mean(dim=1)
    std = f.std(dim=0, unbiased=False).mean() if f.shape[0] > 1 else torch.tensor(float("nan"))
    return {"target_std": float(std), "effective_rank": effective_rank(f)}


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return repr(v)
    return str(v)


class LossHistory:
    """Rows of logged metrics, keyed by step (strictly increasing)."""

    def __init__(self, columns: tuple[str, ...] = CSV_COLUMNS):
        self.columns = tuple(columns)
        self.rows: list[dict[str, Any]] = []

    def append(self, row: Mapping[str, Any]) -> None:
        if self.rows and int(row["step"]) <= int(self.rows[-1]["step"]):
            raise ValueError(f"history step {row['step']} is not after {self.rows[-1]['step']}")
        self.rows.append({c: row.get(c) for c in self.columns})

    def truncate(self, step: int) -> None:
        """Drop rows after `step`."""
        self.rows = [r for r in self.rows if int(r["step"]) <= step]

    def state_dict(self) -> dict[str, list]:
        """Column-wise plain lists (None for missing) — safe for weights_only checkpoints."""
        out: dict[str, list] = {}
        for c in self.columns:
            col = []
            for r in self.rows:
                v = r.get(c)
                col.append(None if v is None else (int(v) if c == "step" or c == "epoch" else float(v)))
            out[c] = col
        return out

    def load_state_dict(self, state: Mapping[str, list]) -> None:
        n = len(state.get("step", []))
        self.rows = [{c: (state[c][i] if c in state else None) for c in self.columns} for i in range(n)]

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        for r in self.rows:
            w.writerow([_fmt(r.get(c)) for c in self.columns])
        return buf.getvalue()

    def write_csv(self, path: str | Path) -> None:
        atomic.write_text(path, self.to_csv())

    @staticmethod
    def read_csv(path: str | Path) -> list[dict[str, float]]:
        with open(path, newline="") as fh:
            return [{k: (float(v) if v not in ("", None) else float("nan")) for k, v in row.items()}
                    for row in csv.DictReader(fh)]

    def series(self, name: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["step"]), float(r[name])) for r in self.rows if r.get(name) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    def __len__(self) -> int:
        return len(self.rows)
