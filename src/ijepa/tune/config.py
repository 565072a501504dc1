"""The study's configuration: `TuneConfig` (conf/base/parameters_tune.yml, key `tune`), the
search space of a trial and the short pretraining run each trial does."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from ijepa.config import from_mapping, require

__all__ = ["SearchSpace", "TrialSettings", "TuneConfig", "load_tune_config", "DEFAULT_STORAGE"]

DEFAULT_STORAGE = "sqlite:///data/07_tune/optuna.db"


def _check_range(name: str, r: Sequence[float], lo: float, hi: float, lo_open: bool = True,
                 hi_open: bool = False) -> None:
    ok = (len(r) == 2 and all(math.isfinite(x) for x in r) and r[0] <= r[1]
          and (r[0] > lo if lo_open else r[0] >= lo) and (r[1] < hi if hi_open else r[1] <= hi))
    lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
    require(ok, f"{name} must be [min, max] with min <= max, both in {lb}{lo:g}, {hi:g}{rb}; got {list(r)!r}")


@dataclass(frozen=True)
class SearchSpace:
    """What a trial draws (uniform unless said otherwise); a range with min == max fixes the value.

    pred_scale = (pred_scale_min, min(1, pred_scale_min + pred_scale_span)): target blocks;
    enc_scale = (enc_scale_min, 1.0): the context block; npred: number of target blocks
    (categorical); pred_aspect = (pred_aspect_min, pred_aspect_max); lr: peak learning
    rate, log-uniform, searched only when set.
    """

    pred_scale_min: tuple[float, float] = (0.1, 0.3)
    pred_scale_span: tuple[float, float] = (0.0, 0.1)
    enc_scale_min: tuple[float, float] = (0.6, 1.0)
    npred: tuple[int, ...] = (1, 2, 4)
    pred_aspect_min: tuple[float, float] = (0.5, 1.0)
    pred_aspect_max: tuple[float, float] = (1.0, 2.0)
    lr: tuple[float, float] | None = None

    def validate(self) -> None:
        _check_range("pred_scale_min", self.pred_scale_min, 0.0, 1.0)
        _check_range("pred_scale_span", self.pred_scale_span, 0.0, 1.0, lo_open=False, hi_open=True)
        _check_range("enc_scale_min", self.enc_scale_min, 0.0, 1.0)
        _check_range("pred_aspect_min", self.pred_aspect_min, 0.0, math.inf, hi_open=True)
        _check_range("pred_aspect_max", self.pred_aspect_max, 0.0, math.inf, hi_open=True)
        require(len(self.npred) >= 1 and all(n >= 1 for n in self.npred) and len(set(self.npred)) == len(self.npred),
                f"npred must list distinct integers >= 1, got {list(self.npred)!r}")
        if self.lr is not None:
            _check_range("lr", self.lr, 0.0, math.inf, hi_open=True)


@dataclass(frozen=True)
class TrialSettings:
    """The short pretraining run of one trial (merged over the dataset's pretrain params)."""

    total_steps: int = 120
    eval_every: int = 40            # checkpoint + val score every this many steps: the pruner's resource
    warmup_steps: int | None = None  # null = 10% of total_steps
    batch_size: int | None = None    # null = the pretraining batch size
    overrides: dict = field(default_factory=dict)  # any other pretraining parameters, deep-merged
    keep_checkpoints: bool = False   # trial folders keep only the exported encoder + summary by default

    def validate(self) -> None:
        require(self.total_steps >= 1, f"total_steps must be >= 1, got {self.total_steps}")
        require(1 <= self.eval_every <= self.total_steps,
                f"eval_every must be in [1, total_steps={self.total_steps}], got {self.eval_every}")
        require(self.warmup_steps is None or 0 <= self.warmup_steps <= self.total_steps,
                f"warmup_steps must be in [0, total_steps] or null, got {self.warmup_steps}")
        require(self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class TuneConfig:
    """conf/base/parameters_tune.yml, key `tune` (plus the run's `dataset`)."""

    dataset: str | None = None
    n_trials: int | None = 8         # trials THIS invocation adds (all workers together); null = until timeout
    timeout_s: float | None = None   # per worker
    workers: int = 1                 # processes on the same storage (Optuna's distributed mode)
    storage: str = DEFAULT_STORAGE   # any SQLAlchemy URL: sqlite:///..., postgresql://user@host/db
    study_name: str | None = None    # null = ijepa-masks-<dataset>
    seed: int = 0
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_startup_trials: int = 2   # median: trials that finish before pruning starts
    objective: Literal["linear", "lowshot"] = "linear"
    max_train: int | None = 5000     # val score: random subset of train / val (speed)
    max_val: int | None = 2000
    probe_overrides: dict = field(default_factory=dict)   # over the dataset's probe params
    enqueue_base: bool = True        # a new study's first trial = the base masks (when inside the space)
    mlflow: bool = True
    experiment: str | None = None    # when no parent run is given/active: null = the dataset
    # Optuna heartbeats: a RUNNING trial whose worker stopped beating (killed, machine lost) for
    # grace_period seconds is marked FAIL by the next worker and re-queued (stale_retries times).
    heartbeat_interval: int = 60
    grace_period: int = 300
    stale_retries: int = 2
    trial: TrialSettings = field(default_factory=TrialSettings)
    space: SearchSpace = field(default_factory=SearchSpace)

    def validate(self) -> None:
        require(self.n_trials is None or self.n_trials >= 0, f"n_trials must be >= 0 or null, got {self.n_trials}")
        require(self.timeout_s is None or self.timeout_s > 0, f"timeout_s must be positive or null, got {self.timeout_s}")
        require(self.n_trials is not None or self.timeout_s is not None, "n_trials and timeout_s cannot both be null")
        require(self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        require(bool(self.storage), "storage must be a database URL, e.g. sqlite:///data/07_tune/optuna.db")
        require(self.study_name is not None or bool(self.dataset), "study_name or dataset must be set")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        require(self.pruner_startup_trials >= 0, f"pruner_startup_trials must be >= 0, got {self.pruner_startup_trials}")
        for name in ("max_train", "max_val"):
            v = getattr(self, name)
            require(v is None or v >= 1, f"{name} must be >= 1 or null, got {v}")
        require(self.heartbeat_interval >= 1, f"heartbeat_interval must be >= 1 (seconds), got {self.heartbeat_interval}")
        # a live worker beats every heartbeat_interval s: a shorter grace would fail its trial
        require(self.grace_period > self.heartbeat_interval,
                f"grace_period must be > heartbeat_interval={self.heartbeat_interval} (seconds), got {self.grace_period}")
        require(self.stale_retries >= 0, f"stale_retries must be >= 0, got {self.stale_retries}")

    @property
    def name(self) -> str:
        return self.study_name or f"ijepa-masks-{self.dataset}"


def load_tune_config(cfg: TuneConfig | Mapping[str, Any] | None) -> TuneConfig:
    return from_mapping(TuneConfig, cfg, "tune")
