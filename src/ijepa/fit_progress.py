"""Progress of the probe stage's head fits: a bar over the fits and a log line per fit with an ETA."""
from __future__ import annotations

import logging
import time
from typing import Mapping

from tqdm.auto import tqdm

__all__ = ["FitProgress"]

log = logging.getLogger("ijepa.probes")  # the probe stage's logger: its lines read as the stage's


class FitProgress:
    """The head fits after the feature bars: a bar over the fits and a log line per fit with its
    time and an ETA, the remaining work weighted by each fit's size (train rows x feature dims,
    all seeds of a low-shot probe together), so no fit phase runs silent."""

    def __init__(self, work: Mapping[tuple[str, str], float], bar: bool = True):
        self.work, self.total = dict(work), len(work)
        self.all = self.left = float(sum(work.values()))
        self.t0, self.count = time.perf_counter(), 0
        self.bar = tqdm(total=self.total, desc="probe fits", unit="fit", disable=not bar, leave=False)

    def done(self, probe: str, model: str, seconds: float) -> None:
        self.count += 1
        self.left -= self.work[(probe, model)]
        elapsed = time.perf_counter() - self.t0
        finished = self.all - self.left
        eta = elapsed / finished * self.left if finished > 0 else 0.0
        self.bar.update(1)
        log.info("probe fit %d/%d: %s on %s features in %.1f s; %.0f s so far, about %.0f s left",
                 self.count, self.total, probe, model, seconds, elapsed, eta)

    def close(self) -> None:
        self.bar.close()
