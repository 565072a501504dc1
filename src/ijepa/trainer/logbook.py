"""What the loop reports: the window-mean loss and the other signals at log steps, to the
loss history (CSV, DVC plots), the tracker and the progress bar, plus the collapse warning."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ijepa.monitor import LossHistory
from ijepa.tracking import Tracker
from ijepa.train_config import CollapseConfig

__all__ = ["Logbook"]

log = logging.getLogger("ijepa.trainer")


class Logbook:
    def __init__(self, tracker: Tracker, loss_csv: Path, collapse: CollapseConfig, is_main: bool):
        self.tracker = tracker
        self.loss_csv = loss_csv
        self.collapse = collapse
        self.is_main = is_main  # only rank 0 writes the CSV and talks to the tracker
        self.history = LossHistory()
        self.collapse_warnings = 0
        self.window = {"loss_sum": 0.0, "count": 0}

    def add_losses(self, losses: list[float]) -> None:
        """Per-step losses (host floats, in step order) read from the device since the last read."""
        for value in losses:
            self.window["loss_sum"] += value
            self.window["count"] += 1

    def add(self, stats: dict[str, Any], step: int, is_log_step: bool, epoch: int, images_per_s: float,
            bar: Any = None) -> None:
        """At a log step, write a row: the window's mean loss (`add_losses`) and `stats` (host numbers)."""
        if not is_log_step:
            return
        loss = self.window["loss_sum"] / max(1, self.window["count"])
        self.window = {"loss_sum": 0.0, "count": 0}
        row = {"step": step, "epoch": epoch, "loss": loss,
               "lr": stats["lr"], "weight_decay": stats["weight_decay"], "ema_momentum": stats["momentum"],
               "grad_norm": stats["grad_norm"], "target_std": stats.get("target_std"),
               "effective_rank": stats.get("effective_rank"), "context_tokens": stats["context_tokens"],
               "img_per_s": images_per_s}
        self.history.append(row)
        if not self.is_main:
            return
        self.history.write_csv(self.loss_csv)
        self.tracker.log_metrics({k: v for k, v in row.items() if k != "step" and v is not None}, step)
        self._check_collapse(row)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{stats['lr']:.2e}", img_s=f"{images_per_s:.0f}", refresh=False)

    def _check_collapse(self, row: dict[str, Any]) -> None:
        c = self.collapse
        std, rank = row.get("target_std"), row.get("effective_rank")
        bad = []
        if std is not None and math.isfinite(std) and std < c.std_min:
            bad.append(f"target_std={std:.3g} < {c.std_min}")
        if rank is not None and math.isfinite(rank) and rank < c.rank_min:
            bad.append(f"effective_rank={rank:.3g} < {c.rank_min}")
        if bad:
            self.collapse_warnings += 1
            msg = f"possible representation collapse at step {row['step']}: " + ", ".join(bad)
            log.warning(msg)
            self.tracker.set_tag("collapse_warning", msg)

    def final_loss(self) -> float | None:
        return float(self.history.rows[-1]["loss"]) if self.history.rows else None

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.state_dict(), "log_window": dict(self.window)}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        self.history.load_state_dict(state["history"])
        self.history.truncate(step)
        self.window = {"loss_sum": float(state["log_window"]["loss_sum"]), "count": int(state["log_window"]["count"])}
