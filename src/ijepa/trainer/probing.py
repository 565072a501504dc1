"""Probes along training: val-split scores of the exported (target) encoder at checkpoints.

At every `monitor.every_checkpoints`-th checkpoint step and at the last step, rank 0 scores a
copy of the encoder (`ProbeMonitor.record`), before the checkpoint is written so that the
checkpoint holds the score of its own step:

  knn_top1     weighted kNN (ijepa.knn, cosine, k, temperature) of the val subset against a
               fixed, seeded subset of the train split as the labelled bank, on standardised
               features as in the probe stage's kNN
  linear_top1  with `monitor.linear`: the probe stage's linear heads fitted on that train subset,
               best val top-1 over the weight-decay grid (ijepa.val_probe.ValProbe, same features)

The test split is never read. Both are logged to the tracker at the step (a curve next to the
loss), appended to the probes CSV (a DVC plot) and kept in the checkpoint, so a resumed run
keeps its history and best score. Scoring cannot change the training: it runs on a deep copy,
between saved and restored global RNG states (torch, numpy, python, CUDA).

The best encoder (highest monitored score: linear_top1 when `linear`, else knn_top1; the
earlier step on ties) is written to ``<out>/best_encoder/step-<step>/`` when it appears, as an
exported encoder (ijepa.export, atomic files). Checkpoints rotate, so this is what `export:
best` exports at the end. A new best keeps the previous best's folder until the next score: the
newest complete checkpoint may still name it after a kill (the caller waits for the checkpoint
in flight before scoring, so no older one is the resume point); by the next score the
checkpoint naming the new best is complete, and only that folder stays.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ijepa.knn import knn_top1
from ijepa.monitor import LossHistory
from ijepa.tracking import Tracker
from ijepa.train_config import MonitorConfig

__all__ = ["ProbeMonitor", "check_monitor_data", "PROBE_COLUMNS", "BEST_SUBDIR"]

log = logging.getLogger("ijepa.trainer")

PROBE_COLUMNS = ("step", "knn_top1", "linear_top1", "seconds")
BEST_SUBDIR = "best_encoder"
METRIC_PREFIX = "val_"  # tracker metrics: val_knn_top1, val_linear_top1


def check_monitor_data(cfg: MonitorConfig, manifest: dict[str, Any], encoder_depth: int, where: str) -> None:
    """Before any work: the shards have the train and val splits with `cls` labels, and the
    encoder has the layers the features pool (ConfigError naming the field)."""
    from ijepa.config import require

    if not cfg.enabled:
        return
    probe = cfg.probe_config()
    splits = manifest.get("splits") or {}
    for split in (probe.train_split, probe.val_split):
        require(split in splits, f"monitor: probes along training need the {split!r} split, {where} has "
                                 f"{sorted(splits)} (set monitor.enabled: false)")
    require("cls" in (manifest.get("labels") or {}),
            f"monitor: probes along training need `cls` labels, {where} has {sorted(manifest.get('labels') or {})} "
            f"(set monitor.enabled: false)")
    require(probe.n_last <= encoder_depth, f"monitor.probe.n_last: {probe.n_last} layers pooled, but the encoder "
                                           f"has depth {encoder_depth}")


class ProbeMonitor:
    """The probe history of one run (rank 0 scores, writes and logs; every rank keeps the state)."""

    def __init__(self, cfg: MonitorConfig, shard_dir: str | Path, out_dir: str | Path, csv_path: str | Path,
                 tracker: Tracker, checkpoint_every: int, is_main: bool):
        self.cfg = cfg
        self.shard_dir = Path(shard_dir)
        self.best_root = Path(out_dir) / BEST_SUBDIR
        self.csv_path = Path(csv_path)
        self.tracker = tracker
        self.checkpoint_every = checkpoint_every
        self.is_main = is_main
        self.history = LossHistory(PROBE_COLUMNS)
        self._val = None

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    @property
    def score_name(self) -> str:
        return self.cfg.score_name

    def due(self, step: int, total_steps: int) -> bool:
        """Whether `step` (a checkpoint step) is scored: every `every_checkpoints`-th checkpoint, and the last."""
        if not self.enabled or step <= 0:
            return False
        if step == total_steps:
            return True
        return step % self.checkpoint_every == 0 and (step // self.checkpoint_every) % self.cfg.every_checkpoints == 0

    # -- scoring ------------------------------------------------------------------------
    def val_probe(self):
        """The train/val subsets, loaded once (first score) with the probe stage's head settings."""
        if self._val is None:
            from ijepa.val_probe import ValProbe

            self._val = ValProbe(self.cfg.probe_config(), self.shard_dir, "linear", self.cfg.max_train,
                                 self.cfg.max_val)
        return self._val

    def score(self, encoder: torch.nn.Module, device: torch.device | str) -> dict[str, float]:
        """{"knn_top1": ..., "linear_top1": ... (with `linear`)} of `encoder` on the val subset."""
        vp = self.val_probe()
        tx, vx = vp.features(encoder, device)
        out = {"knn_top1": knn_top1(tx, vp.train_y, vx, vp.val_y, k=self.cfg.knn_k,
                                    temperature=self.cfg.knn_temperature, n_classes=vp.n_classes, standardise=True)}
        if self.cfg.linear:
            out["linear_top1"] = vp.score_features(tx, vx)
        return out

    def record(self, step: int, encoder: torch.nn.Module, device: torch.device | str,
               metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Rank 0: score `encoder` (a copy the caller owns) at `step`; CSV, tracker, and the best
        encoder's folder when this is a new best. Returns the row."""
        from ijepa import checkpoint as ckpt

        previous = self.best()
        if previous is not None:  # every complete checkpoint names this best or a later one (the caller waited)
            self._prune(keep={previous["step"]})
        t0 = time.perf_counter()
        rng = ckpt.rng_state()  # whatever the heads or the feature pass draw, training never sees it
        try:
            scores = self.score(encoder, device)
        finally:
            ckpt.set_rng_state(rng)
        row = {"step": step, **scores, "seconds": time.perf_counter() - t0}
        self.history.append(row)
        self.history.write_csv(self.csv_path)
        self.tracker.log_metrics({f"{METRIC_PREFIX}{k}": v for k, v in scores.items()}, step)
        best = self.best()
        if best is not None and best["step"] == step:
            meta = {**(metadata or {}), "step": step, "monitor": {"score": self.score_name, **scores}}
            from ijepa.export import save_encoder

            save_encoder(encoder, self.best_dir(step), metadata=meta)
            self._prune(keep={step, previous["step"] if previous else step})
            self.tracker.log_metrics({f"{METRIC_PREFIX}best_{self.score_name}": best["score"]}, step)
        log.info("probes at step %d: val kNN top-1 %.4f%s (%.1f s)%s", step, scores["knn_top1"],
                 f", linear top-1 {scores['linear_top1']:.4f}" if "linear_top1" in scores else "", row["seconds"],
                 " new best" if best is not None and best["step"] == step else "")
        return row

    # -- best ---------------------------------------------------------------------------
    def best(self) -> dict[str, Any] | None:
        """{"step", "score"} of the highest monitored score so far (the earlier step on ties)."""
        found = None
        for r in self.history.rows:
            v = r.get(self.score_name)
            if v is not None and math.isfinite(float(v)) and (found is None or float(v) > found["score"]):
                found = {"step": int(r["step"]), "score": float(v)}
        return found

    def settle(self) -> None:
        """At the end (the last checkpoint complete): only the best folder stays."""
        best = self.best()
        if self.is_main and best is not None:
            self._prune(keep={best["step"]})

    def best_dir(self, step: int) -> Path:
        return self.best_root / f"step-{step:08d}"

    def _prune(self, keep: set[int]) -> None:
        if not self.best_root.is_dir():
            return
        names = {self.best_dir(s).name for s in keep}
        for d in self.best_root.iterdir():
            if d.name not in names:
                shutil.rmtree(d, ignore_errors=False) if d.is_dir() else d.unlink()

    # -- run folder, checkpoint state ---------------------------------------------------
    def start_fresh(self) -> None:
        """A new run (not resumed): no probes CSV or best folders of an earlier run mix in."""
        if self.is_main:
            self.csv_path.unlink(missing_ok=True)
            shutil.rmtree(self.best_root, ignore_errors=True)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None, step: int) -> None:
        """The history of the checkpoint of `step` (rows after it dropped: they are scored again);
        rank 0 rewrites the CSV and drops best folders of steps the history does not keep."""
        self.history.load_state_dict((state or {}).get("history") or {})
        self.history.truncate(step)
        if not self.is_main:
            return
        if self.enabled or self.history.rows:
            self.history.write_csv(self.csv_path)
        best = self.best()
        if best is not None:
            if not (self.best_dir(best["step"]) / "encoder.safetensors").is_file():
                log.warning("probes along training: the best encoder of step %d is missing from %s; `export: best` "
                            "will fail", best["step"], self.best_root)
            self._prune(keep={best["step"]})

    def best_encoder_dir(self) -> Path:
        """The folder of the best encoder (for `export: best`); CheckpointError when it is gone."""
        from ijepa import checkpoint as ckpt

        best = self.best()
        if best is None:
            raise ckpt.CheckpointError("export: best, but no probe score was recorded along training")
        path = self.best_dir(best["step"])
        if not (path / "encoder.safetensors").is_file():
            raise ckpt.CheckpointError(f"export: best, but the best encoder (step {best['step']}) is missing: {path}; "
                                       f"delete the run folder's checkpoints to train again, or use export: last")
        return path

    def summary(self) -> dict[str, Any]:
        """The last and best scores, for the run summary and the stage's metrics."""
        last = self.history.rows[-1] if self.history.rows else None
        best = self.best()
        return {"score": self.score_name, "scored_steps": [int(r["step"]) for r in self.history.rows],
                "last_step": int(last["step"]) if last else None,
                "last_knn_top1": last.get("knn_top1") if last else None,
                "last_linear_top1": last.get("linear_top1") if last else None,
                "best_step": best["step"] if best else None, "best_score": best["score"] if best else None,
                "seconds": sum(float(r["seconds"]) for r in self.history.rows if r.get("seconds") is not None)}

