"""Per-iteration schedules for I-JEPA pretraining (lr, weight decay, EMA momentum), as small step objects.

Each schedule is a pure function of the iteration index ``t`` (``value(t)``) wrapped in an
object that counts steps (``step()`` returns the value for the current iteration, then
advances), with ``state_dict()`` / ``load_state_dict()`` holding only that counter. Because
the values depend on ``t`` alone, resuming needs nothing but the step number.

- `WarmupCosine`: learning rate, linear warm-up ``start -> peak`` over ``warmup`` steps,
  then cosine ``peak -> final`` until ``total``: value(0) = start, value(warmup) = peak,
  value(total) = final.
- `Cosine`: weight decay, cosine from ``start`` (0.04) to ``end`` (0.4) over ``total`` (the
  reference code's schedule; the paper says "linearly increased").
- `Linear`: EMA momentum, linear from ``start`` (0.996) to ``end`` (1.0) over ``total``.

Values past ``total`` stay at the end value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Schedule", "WarmupCosine", "Cosine", "Linear"]


class Schedule:
    """Base class: a value per iteration plus a step counter."""

    def __init__(self) -> None:
        self.t = 0

    def value(self, t: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self) -> float:
        """Value for the current iteration, then advance the counter."""
        v = self.value(self.t)
        self.t += 1
        return v

    @property
    def current(self) -> float:
        return self.value(self.t)

    def state_dict(self) -> dict[str, Any]:
        return {"t": int(self.t)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _progress(t: int, begin: int, end: int) -> float:
    if end <= begin:
        return 1.0
    return min(max((t - begin) / (end - begin), 0.0), 1.0)


class WarmupCosine(Schedule):
    """Linear warm-up start -> peak over `warmup` steps, cosine peak -> final until `total`."""

    def __init__(self, start: float, peak: float, final: float, warmup: int, total: int):
        super().__init__()
        if total < 1 or warmup < 0 or warmup > total:
            raise ValueError(f"need 0 <= warmup <= total and total >= 1, got warmup={warmup}, total={total}")
        self.start, self.peak, self.final = float(start), float(peak), float(final)
        self.warmup, self.total = int(warmup), int(total)

    def value(self, t: int) -> float:
        if t < self.warmup:
            return self.start + (self.peak - self.start) * t / self.warmup
        p = _progress(t, self.warmup, self.total)
        return self.final + (self.peak - self.final) * 0.5 * (1.0 + math.cos(math.pi * p))


class _StartEnd(Schedule):
    """A schedule from `start` (t=0) to `end` (t=total)."""

    def __init__(self, start: float, end: float, total: int):
        super().__init__()
        if total < 1:
            raise ValueError(f"total must be >= 1, got {total}")
        self.start, self.end, self.total = float(start), float(end), int(total)


class Cosine(_StartEnd):
    """Cosine from `start` (t=0) to `end` (t=total); increasing when end > start."""

    def value(self, t: int) -> float:
        p = _progress(t, 0, self.total)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * p))


class Linear(_StartEnd):
    """Linear from `start` (t=0) to `end` (t=total)."""

    def value(self, t: int) -> float:
        return self.start + (self.end - self.start) * _progress(t, 0, self.total)


@dataclass
class TrainSchedules:
    """The three schedules of a run, stepped together once per iteration."""

    lr: WarmupCosine
    weight_decay: Cosine
    momentum: Linear

    def step(self) -> dict[str, float]:
        return {"lr": self.lr.step(), "weight_decay": self.weight_decay.step(),
                "momentum": self.momentum.step()}

    def at(self, t: int) -> dict[str, float]:
        return {"lr": self.lr.value(t), "weight_decay": self.weight_decay.value(t),
                "momentum": self.momentum.value(t)}

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr.state_dict(), "weight_decay": self.weight_decay.state_dict(),
                "momentum": self.momentum.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr.load_state_dict(state["lr"])
        self.weight_decay.load_state_dict(state["weight_decay"])
        self.momentum.load_state_dict(state["momentum"])


__all__ += ["TrainSchedules"]
