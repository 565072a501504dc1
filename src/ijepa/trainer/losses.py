"""The loss stays on the device: no host sync per step.

Each step appends its (detached, fp32) loss to `LossWindow`; every `log_every` steps and before
every checkpoint the window is averaged over ranks in one collective and read to the host
in one transfer. A NaN/inf among them raises `NonFiniteLossError` naming the first bad step:
the run stops within `log_every` steps, and since the check runs before every checkpoint,
no checkpoint holds weights trained on a non-finite loss (the last good one is named).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ijepa.distributed import DistInfo, all_reduce_mean

__all__ = ["NonFiniteLossError", "LossWindow"]

# a long window (log_every in the thousands) is folded into one tensor now and then
_FOLD = 256


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped, no checkpoint was written after it."""


class LossWindow:
    def __init__(self, dist: DistInfo):
        self.dist = dist
        self.first_step = 0  # global step (0-based) of the first pending loss
        self._chunks: list[torch.Tensor] = []
        self._scalars: list[torch.Tensor] = []

    def __len__(self) -> int:
        return sum(c.numel() for c in self._chunks) + len(self._scalars)

    def append(self, step: int, loss: torch.Tensor) -> None:
        if not len(self):
            self.first_step = step
        self._scalars.append(loss.detach().float().reshape(()))
        if len(self._scalars) >= _FOLD:
            self._chunks.append(torch.stack(self._scalars))
            self._scalars = []

    def read(self, describe: Callable[[int, float], str]) -> list[float]:
        """Mean over ranks of every pending loss, in step order, as floats (a collective: all
        ranks call it at the same steps). Raises NonFiniteLossError(describe(step, value))
        at the first non-finite one."""
        if not len(self):
            return []
        parts = self._chunks + ([torch.stack(self._scalars)] if self._scalars else [])
        values = all_reduce_mean(torch.cat(parts), self.dist).tolist()
        self._chunks, self._scalars = [], []
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise NonFiniteLossError(describe(self.first_step + i, v))
        return values
