"""Mask-ratio search with Optuna (DESIGN §1 "tune", §6, §7): short pretraining runs scored
by a val-split probe, pruned at checkpoints, on a shared Optuna storage, tracked as nested
MLflow runs; the winner handed to `dvc repro` through conf/base/parameters_tuned.yml.

    run_study(tune_cfg, base_pretrain, probe, shard_dir, work_dir) -> summary dict
    apply_best(dataset, storage=..., study_name=..., params_file=...) -> the masks written

One trial = a point of the search space (`SearchSpace`: target-block scale range, context
scale lower bound, number of target blocks, target aspect range, optionally lr) merged into
the dataset's pretraining parameters, then `ijepa.train.run_pretraining` (the library's own
loop, nothing copied) with `total_steps` / `eval_every` of `TrialSettings`. At every
checkpoint (every `eval_every` steps and at the end) the `on_checkpoint` hook scores the
TARGET encoder with `ijepa.probes.ValProbe` (linear or low-shot head, val top-1; the test
split is never read), reports it to the trial and lets the pruner (median, Hyperband or
none) stop the run. The objective is the score at the last step.

A trial that raises (masks that cannot be sampled on the grid, NaN loss, ...) is recorded
as FAIL with its reason in the trial's user attribute `fail_reason` and the MLflow tag of
the same name; the study goes on.

Storage: any SQLAlchemy URL (default a sqlite file under data/); the study is created with
`load_if_exists`, so re-running continues it (`n_trials` = trials this invocation adds).
`workers > 1` starts that many processes (`python -m ijepa.tune worker --spec ...`) on the
same storage, which is Optuna's own distributed mode; more workers on other machines join
with `python -m ijepa.tune worker --dataset D --storage postgresql://...`.

MLflow (DESIGN §6: no `mlflow.start_run` nesting): the PARENT is the active run (the
kedro-mlflow run of `kedro run --pipeline tune`), a given run id, or one created with
`MlflowClient.create_run` (then also terminated here). Each trial gets a CHILD run created
with `MlflowClient.create_run(..., tags={"mlflow.parentRunId": parent})` and is logged
through `ijepa.tracking.MlflowTracker`: trial params (`trial.*`), the pretraining config,
losses, `val_score` at each checkpoint, `objective`, tag `trial_state` (COMPLETE / PRUNED /
FAIL), status FINISHED / KILLED / FAILED. The parent gets the optimisation-history and
parameter-importance PNGs, `best_value`, tags `best.<param>` and `best_trial.json`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from ijepa import atomic
from ijepa.config import ConfigError, as_dict, deep_merge, from_mapping, require

__all__ = ["SearchSpace", "TrialSettings", "TuneConfig", "load_tune_config", "run_study", "apply_best",
           "best_masks", "suggest", "masks_from_params", "trial_pretrain_params", "open_study", "storage_for",
           "write_tuned_masks", "DEFAULT_STORAGE", "main"]

log = logging.getLogger("ijepa.tune")

DEFAULT_STORAGE = "sqlite:///data/07_tune/optuna.db"
PARENT_ATTR = "mlflow_parent_run_id"


# ---------------------------------------------------------------------------------- config
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

    @property
    def name(self) -> str:
        return self.study_name or f"ijepa-masks-{self.dataset}"


def load_tune_config(cfg: TuneConfig | Mapping[str, Any] | None) -> TuneConfig:
    return from_mapping(TuneConfig, cfg, "tune")


# ---------------------------------------------------------------------------------- search
def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Draw one point (flat Optuna params) from `space`."""
    p: dict[str, Any] = {
        "pred_scale_min": trial.suggest_float("pred_scale_min", *space.pred_scale_min),
        "pred_scale_span": trial.suggest_float("pred_scale_span", *space.pred_scale_span),
        "enc_scale_min": trial.suggest_float("enc_scale_min", *space.enc_scale_min),
        "npred": trial.suggest_categorical("npred", list(space.npred)),
        "pred_aspect_min": trial.suggest_float("pred_aspect_min", *space.pred_aspect_min),
        "pred_aspect_max": trial.suggest_float("pred_aspect_max", *space.pred_aspect_max),
    }
    if space.lr is not None:
        p["lr"] = trial.suggest_float("lr", *space.lr, log=True)
    return p


def _r(x: float) -> float:
    return float(round(float(x), 4))


def masks_from_params(p: Mapping[str, Any]) -> dict[str, Any]:
    """Flat trial params -> the `masks` parameters they set."""
    lo = float(p["pred_scale_min"])
    a, b = float(p["pred_aspect_min"]), float(p["pred_aspect_max"])
    return {"npred": int(p["npred"]), "pred_scale": [_r(lo), _r(min(1.0, lo + float(p["pred_scale_span"])))],
            "pred_aspect": [_r(min(a, b)), _r(max(a, b))], "enc_scale": [_r(p["enc_scale_min"]), 1.0]}


def _params_from_masks(masks: Mapping[str, Any]) -> dict[str, Any] | None:
    """Inverse of masks_from_params for a base config (None when it has no such form)."""
    try:
        ps, pa, es = masks["pred_scale"], masks["pred_aspect"], masks["enc_scale"]
        if float(es[1]) != 1.0:
            return None
        return {"pred_scale_min": float(ps[0]), "pred_scale_span": float(ps[1]) - float(ps[0]),
                "enc_scale_min": float(es[0]), "npred": int(masks["npred"]),
                "pred_aspect_min": float(pa[0]), "pred_aspect_max": float(pa[1])}
    except (KeyError, TypeError, IndexError, ValueError):
        return None


def _inside(params: Mapping[str, Any], space: SearchSpace) -> bool:
    for name in ("pred_scale_min", "pred_scale_span", "enc_scale_min", "pred_aspect_min", "pred_aspect_max"):
        lo, hi = getattr(space, name)
        if not lo - 1e-9 <= params[name] <= hi + 1e-9:
            return False
    return params["npred"] in space.npred


def trial_pretrain_params(base: Mapping[str, Any], cfg: TuneConfig, params: Mapping[str, Any],
                          threads: int | None = None) -> dict[str, Any]:
    """The pretraining parameters of one trial: base, then trial overrides, then the point."""
    t = cfg.trial
    out = deep_merge(dict(base), dict(t.overrides))
    optim = {"total_steps": t.total_steps,
             "warmup_steps": t.warmup_steps if t.warmup_steps is not None else max(0, t.total_steps // 10)}
    if t.batch_size is not None:
        optim["batch_size"] = t.batch_size
    if "lr" in params:
        optim["lr"] = float(params["lr"])
    run = {"checkpoint_every": t.eval_every, "keep_last": 1, "progress": False, "nproc": 1}
    if threads is not None and out.get("threads") is None:
        run["threads"] = threads
    log_every = int(out.get("log_every", 10))
    run["log_every"] = max(1, min(log_every, t.eval_every))
    return deep_merge(out, {"masks": masks_from_params(params), "optimisation": optim, **run})


# ---------------------------------------------------------------------------------- storage
def redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for display
        return url


def storage_for(url: str):
    """An Optuna RDBStorage with heartbeats; sqlite files get their folder and a long lock
    timeout (several processes write to one file), other URLs are used as given."""
    import optuna

    engine_kwargs: dict[str, Any] = {}
    sqlite = url.startswith("sqlite:")
    if sqlite:
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level None: pysqlite leaves transactions to us (see _serialize_sqlite_writes)
        engine_kwargs = {"connect_args": {"timeout": 300, "isolation_level": None}}
    # Heartbeats: a trial whose worker died (killed, machine lost) is marked FAIL by the next
    # worker that starts a trial, instead of staying RUNNING forever.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs or None, heartbeat_interval=60,
                                             grace_period=300)
    if sqlite:
        _serialize_sqlite_writes(storage.engine)
    return storage


def _serialize_sqlite_writes(engine) -> None:
    """Every transaction on `engine` starts with BEGIN IMMEDIATE (it takes the write lock).

    Optuna pops an enqueued trial by reading its state and setting it to RUNNING only if it
    was WAITING, with SELECT ... FOR UPDATE, which SQLite ignores; with pysqlite's deferred
    transactions two workers both read WAITING and both run the trial (optuna/optuna#4002;
    here: the base-masks trial ran twice and one worker died on "Cannot tell a COMPLETE
    trial"). With the lock taken at BEGIN the second worker reads RUNNING and moves on.
    This is SQLAlchemy's documented pysqlite recipe (isolation_level None + a "begin" hook)."""
    import sqlalchemy

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _pruner(cfg: TuneConfig):
    import optuna

    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                           n_warmup_steps=cfg.trial.eval_every - 1)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.trial.eval_every, max_resource=cfg.trial.total_steps,
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(cfg: TuneConfig, seed_offset: int = 0):
    """Create or load (`load_if_exists`) the study; the sampler's seed also depends on how
    many trials the study already has, so a continued study does not repeat its points."""
    import optuna

    storage = storage_for(cfg.storage)
    existing = 0
    with contextlib.suppress(KeyError):
        existing = len(optuna.load_study(study_name=cfg.name, storage=storage).trials)
    seed = cfg.seed + seed_offset + existing
    sampler = (optuna.samplers.TPESampler(seed=seed) if cfg.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    return optuna.create_study(storage=storage, study_name=cfg.name, direction="maximize", sampler=sampler,
                               pruner=_pruner(cfg), load_if_exists=True)


# ---------------------------------------------------------------------------------- MLflow
class _Runs:
    """Parent/child MLflow runs through MlflowClient only (never the fluent run stack)."""

    def __init__(self, tracking_uri: str | None, parent_run_id: str):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.parent = parent_run_id
        self.experiment_id = self.client.get_run(parent_run_id).info.experiment_id

    def start_child(self, number: int, study: str, params: Mapping[str, Any]) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=f"trial-{number}",
                                     tags={"mlflow.parentRunId": self.parent, "optuna.study": study,
                                           "optuna.trial": str(number), "trial_state": "RUNNING"})
        rid = run.info.run_id
        self.client.log_batch(rid, params=[Param(f"trial.{k}", str(v)) for k, v in params.items()])
        return rid

    def finish_child(self, rid: str, state: str, value: float | None = None, reason: str | None = None) -> None:
        with contextlib.suppress(Exception):  # tracking problems must not change the trial's outcome
            if value is not None:
                self.client.log_metric(rid, "objective", float(value))
            if reason:
                self.client.set_tag(rid, "fail_reason", reason[:5000])
            self.client.set_tag(rid, "trial_state", state)
            status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED")
            self.client.set_terminated(rid, status)


def _resolve_parent(cfg: TuneConfig, tracking_uri: str | None, parent_run_id: str | None) -> tuple[str, bool]:
    """(parent run id, whether we created it)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if parent_run_id:
        return parent_run_id, False
    active = mlflow.active_run()
    if active is not None:
        return active.info.run_id, False
    client = MlflowClient(tracking_uri=tracking_uri)
    name = cfg.experiment or cfg.dataset or "tune"
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
    run = client.create_run(exp_id, run_name=f"tune-{cfg.name}", tags={"kedro_pipeline": "tune"})
    return run.info.run_id, True


# ---------------------------------------------------------------------------------- objective
class _Objective:
    def __init__(self, cfg: TuneConfig, base_pretrain: Mapping[str, Any], probe: Mapping[str, Any],
                 shard_dir: str | Path, work_dir: str | Path, runs: _Runs | None, threads: int | None):
        self.cfg, self.base, self.runs, self.threads = cfg, dict(base_pretrain), runs, threads
        self.probe_params = deep_merge(dict(probe), dict(cfg.probe_overrides))
        self.shard_dir, self.work_dir = Path(shard_dir), Path(work_dir)
        self._val = None

    def val_probe(self):
        if self._val is None:
            from ijepa.probes import ValProbe

            self._val = ValProbe(self.probe_params, self.shard_dir, self.cfg.objective,
                                 self.cfg.max_train, self.cfg.max_val)
        return self._val

    def __call__(self, trial) -> float:
        import optuna
        import torch

        from ijepa.tracking import MlflowTracker, NullTracker
        from ijepa.train import run_pretraining

        params = suggest(trial, self.cfg.space)
        masks = masks_from_params(params)
        trial.set_user_attr("masks", masks)
        out = self.work_dir / self.cfg.name / f"trial-{trial.number:05d}"
        rid = self.runs.start_child(trial.number, self.cfg.name, params) if self.runs else None
        tracker = MlflowTracker(rid, self.runs.uri) if rid else NullTracker()
        reports: list[tuple[int, float]] = []

        def on_checkpoint(step: int, encoder: torch.nn.Module) -> None:
            device = next(encoder.parameters()).device
            value = self.val_probe().score(encoder, device=device)
            reports.append((step, value))
            trial.report(value, step)
            tracker.log_metrics({"val_score": value}, step)
            log.info("trial %d step %d: val %s %.4f", trial.number, step, self.cfg.objective, value)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (val {self.cfg.objective} {value:.4f})")

        try:
            if out.exists():  # a folder left by an earlier study of the same name: start clean
                shutil.rmtree(out)
            pcfg = trial_pretrain_params(self.base, self.cfg, params, self.threads)
            summary = run_pretraining(pcfg, self.shard_dir, out, tracker=tracker, on_checkpoint=on_checkpoint)
            if reports and reports[-1][0] == summary["steps"]:
                value = reports[-1][1]
            else:  # no checkpoint at the end (should not happen): score the exported encoder
                from ijepa.export import load_encoder

                value = self.val_probe().score(load_encoder(summary["encoder_dir"]))
            if not math.isfinite(value):
                raise RuntimeError(f"objective is {value}")
        except optuna.TrialPruned as err:
            trial.set_user_attr("pruned_at_step", reports[-1][0] if reports else None)
            if self.runs and rid:
                self.runs.client.set_tag(rid, "pruned", str(err))
                self.runs.finish_child(rid, "PRUNED")
            raise
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            log.warning("trial %d failed: %s", trial.number, reason)
            trial.set_user_attr("fail_reason", reason[:2000])
            if self.runs and rid:
                self.runs.finish_child(rid, "FAIL", reason=reason)
            raise
        except BaseException:  # KeyboardInterrupt, SystemExit: the run did not finish
            if self.runs and rid:
                self.runs.finish_child(rid, "FAIL", reason="interrupted")
            raise
        finally:
            if not self.cfg.trial.keep_checkpoints:
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
        if self.runs and rid:
            self.runs.finish_child(rid, "COMPLETE", value=value)
        trial.set_user_attr("final_loss", summary.get("final_loss"))
        return float(value)


def _optimize(cfg: TuneConfig, base_pretrain: Mapping[str, Any], probe: Mapping[str, Any], shard_dir: str | Path,
              work_dir: str | Path, n_trials: int | None, tracking_uri: str | None, parent_run_id: str | None,
              worker_index: int = 0, threads: int | None = None) -> None:
    """One worker: open the study and run up to `n_trials` trials (or until the timeout)."""
    import optuna

    if n_trials == 0:
        return
    study = open_study(cfg, seed_offset=1000 * worker_index)
    runs = _Runs(tracking_uri, parent_run_id) if parent_run_id else None
    objective = _Objective(cfg, base_pretrain, probe, shard_dir, work_dir, runs, threads)
    study.optimize(objective, n_trials=n_trials, timeout=cfg.timeout_s, catch=(Exception,), gc_after_trial=True)


def _split_trials(n: int | None, workers: int) -> list[int | None]:
    if n is None:
        return [None] * workers
    return [n // workers + (1 if i < n % workers else 0) for i in range(workers)]


def _spawn_workers(spec: dict[str, Any], counts: list[int | None], work_dir: Path) -> None:
    spec_path = work_dir / f"worker-spec-{os.getpid()}-{int(time.time() * 1000)}.json"
    atomic.write_json(spec_path, spec)
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("MLFLOW_RUN_ID", None)
    threads = spec.get("threads") or 1
    env.setdefault("OMP_NUM_THREADS", str(threads))
    procs = []
    try:
        for i, n in enumerate(counts):
            cmd = [sys.executable, "-m", "ijepa.tune", "worker", "--spec", str(spec_path), "--index", str(i)]
            if n is not None:
                cmd += ["--n-trials", str(n)]
            log.info("starting tune worker %d: %s", i, " ".join(cmd))
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        raise
    finally:
        spec_path.unlink(missing_ok=True)
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if bad:
        raise RuntimeError(f"tune workers exited with errors (index, exit code): {bad}")


# ---------------------------------------------------------------------------------- reporting
def _counts(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def save_plots(study, out_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """Optimisation history and parameter importances as PNGs; (written, {plot: why skipped})."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    written, skipped = [], {}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    plots = {"optimization_history": ovm.plot_optimization_history,
             "param_importances": ovm.plot_param_importances}
    for name, fn in plots.items():
        if not complete:
            skipped[name] = "no complete trials"
            continue
        if name == "param_importances" and len(complete) < 2:
            skipped[name] = f"needs >= 2 complete trials, the study has {len(complete)}"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = (ax if hasattr(ax, "savefig") else getattr(ax, "figure", None)
                   or ax.flat[0].figure)  # Axes, or an array of Axes
            path = out_dir / f"{name}.png"
            with atomic.atomic_path(path, suffix=".png") as tmp:
                fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
        except Exception as err:  # noqa: BLE001 - e.g. importances of parameters that never varied
            skipped[name] = f"{type(err).__name__}: {err}"
            plt.close("all")
    return written, skipped


def _report_parent(runs: _Runs, study, summary: dict[str, Any], out_dir: Path) -> None:
    client, rid = runs.client, runs.parent
    written, skipped = save_plots(study, out_dir)
    for path in written:
        client.log_artifact(rid, str(path), "tune")
    for name, why in skipped.items():
        client.set_tag(rid, f"plot.{name}", f"skipped: {why}")
    client.set_tag(rid, "optuna.study", summary["study_name"])
    client.set_tag(rid, "optuna.storage", summary["storage"])
    for state, n in summary["states"].items():
        client.log_metric(rid, f"trials_{state.lower()}", n)
    if summary.get("best_value") is not None:
        client.log_metric(rid, "best_value", summary["best_value"])
        client.set_tag(rid, "best_trial", str(summary["best_trial"]))
        for k, v in summary["best_params"].items():
            client.set_tag(rid, f"best.{k}", str(v))
        best = out_dir / "best_trial.json"
        atomic.write_json(best, {k: summary[k] for k in ("study_name", "best_trial", "best_value", "best_params",
                                                         "best_masks")})
        client.log_artifact(rid, str(best), "tune")


# ---------------------------------------------------------------------------------- entry points
def run_study(tune_cfg: TuneConfig | Mapping[str, Any], base_pretrain: Mapping[str, Any],
              probe: Mapping[str, Any], shard_dir: str | Path, work_dir: str | Path, *,
              parent_run_id: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """Run (or continue) the study; returns a JSON-ready summary (module docstring).

    `base_pretrain`: the dataset's resolved pretraining parameters (common + dataset +
    tuned masks); `probe`: the dataset's probe parameters. Everything is validated before
    the first trial: the tune config (ConfigError naming the field), the pretraining config
    at a trial's point (so a base that can never work fails here, not in N trials) and the
    shards.
    """
    import optuna

    from ijepa.train import load_config
    from ijepa.train_data import read_shard_info

    cfg = load_tune_config(tune_cfg)
    work_dir = Path(work_dir)
    # Validate what every trial shares before any trial: the merged pretraining config
    # at the centre of the space and the shard folder.
    centre = {n: (lo + hi) / 2 for n, (lo, hi) in ((n, getattr(cfg.space, n)) for n in
              ("pred_scale_min", "pred_scale_span", "enc_scale_min", "pred_aspect_min", "pred_aspect_max"))}
    centre["npred"] = cfg.space.npred[0]
    if cfg.space.lr is not None:
        centre["lr"] = math.sqrt(cfg.space.lr[0] * cfg.space.lr[1])
    try:
        load_config(trial_pretrain_params(base_pretrain, cfg, centre))
    except ConfigError as err:
        raise ConfigError(f"tune: the pretraining parameters of a trial are invalid: {err}") from None
    read_shard_info(shard_dir, verify=False)
    work_dir.mkdir(parents=True, exist_ok=True)

    threads = max(1, (os.cpu_count() or 1) // cfg.workers) if cfg.workers > 1 else None
    runs = None
    own_parent = False
    if cfg.mlflow:
        import mlflow

        tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        parent_run_id, own_parent = _resolve_parent(cfg, tracking_uri, parent_run_id)
        runs = _Runs(tracking_uri, parent_run_id)
    else:
        parent_run_id = None

    study = open_study(cfg)  # created here once, before any worker starts
    before = len(study.trials)
    if parent_run_id:
        study.set_user_attr(PARENT_ATTR, parent_run_id)
    if cfg.enqueue_base and before == 0:
        from ijepa.masks import MaskConfig

        point = _params_from_masks(deep_merge(as_dict(MaskConfig()), dict(base_pretrain.get("masks") or {})))
        if point is not None and _inside(point, cfg.space):
            if cfg.space.lr is not None:
                lr = float((base_pretrain.get("optimisation") or {}).get("lr", 1e-3))
                if cfg.space.lr[0] <= lr <= cfg.space.lr[1]:
                    point["lr"] = lr
            if cfg.space.lr is None or "lr" in point:
                study.enqueue_trial(point, user_attrs={"enqueued": "base masks"}, skip_if_exists=True)
    log.info("study %s on %s: %d trials so far; adding %s with %d worker(s)", cfg.name, redact(cfg.storage),
             before, cfg.n_trials if cfg.n_trials is not None else f"until {cfg.timeout_s}s", cfg.workers)
    t0 = time.perf_counter()
    status = "FINISHED"
    try:
        if cfg.workers == 1:
            _optimize(cfg, base_pretrain, probe, shard_dir, work_dir, cfg.n_trials, tracking_uri, parent_run_id)
        else:
            spec = {"tune": as_dict(cfg), "base_pretrain": dict(base_pretrain), "probe": dict(probe),
                    "shard_dir": str(shard_dir), "work_dir": str(work_dir), "tracking_uri": tracking_uri,
                    "parent_run_id": parent_run_id, "threads": threads}
            _spawn_workers(spec, _split_trials(cfg.n_trials, cfg.workers), work_dir)
        study = optuna.load_study(study_name=cfg.name, storage=storage_for(cfg.storage))
        summary = study_summary(study, cfg)
        summary.update(trials_added=len(study.trials) - before, seconds=round(time.perf_counter() - t0, 1),
                       parent_run_id=parent_run_id, workers=cfg.workers)
        if runs is not None:
            _report_parent(runs, study, summary, work_dir / cfg.name)
        return summary
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if own_parent and runs is not None:
            runs.client.set_terminated(parent_run_id, status)


def study_summary(study, cfg: TuneConfig) -> dict[str, Any]:
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    out: dict[str, Any] = {"study_name": study.study_name, "storage": redact(cfg.storage), "dataset": cfg.dataset,
                           "objective": f"val {cfg.objective} top-1", "n_trials": len(study.trials),
                           "states": _counts(study), "best_trial": None, "best_value": None, "best_params": {},
                           "best_masks": {}}
    if complete:
        best = study.best_trial
        out.update(best_trial=best.number, best_value=best.value, best_params=dict(best.params),
                   best_masks=best.user_attrs.get("masks") or masks_from_params(best.params))
    out["failed"] = {t.number: t.user_attrs.get("fail_reason", "") for t in study.trials
                     if t.state == optuna.trial.TrialState.FAIL}
    return out


# ---------------------------------------------------------------------------------- hand-off
def best_masks(storage: str, study_name: str) -> tuple[dict[str, Any], Any]:
    """(masks of the best COMPLETE trial, that trial); ValueError when there is none."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage_for(storage))
    except KeyError:
        raise ValueError(f"no study {study_name!r} in {redact(storage)}; run `make tune` first") from None
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        raise ValueError(f"study {study_name!r} in {redact(storage)} has no complete trial yet "
                         f"({len(study.trials)} trials: {_counts(study)})")
    best = study.best_trial
    return dict(best.user_attrs.get("masks") or masks_from_params(best.params)), best


def write_tuned_masks(params_file: str | Path, dataset: str, masks: Mapping[str, Any]) -> None:
    """Set `tuned_masks.<dataset>` in the YAML file atomically, keeping the other datasets'
    entries and the file's leading comment block."""
    import yaml

    path = Path(params_file)
    text = path.read_text() if path.exists() else ""
    header = []
    for line in text.splitlines():
        if line.startswith("#") or (not line.strip() and header):
            header.append(line)
        else:
            break
    while header and not header[-1].strip():
        header.pop()
    doc = yaml.safe_load(text) if text.strip() else {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    tuned = doc.get("tuned_masks") or {}
    if not isinstance(tuned, dict):
        raise ValueError(f"{path}: `tuned_masks` must be a mapping")
    tuned[dataset] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in masks.items()}
    doc["tuned_masks"] = tuned
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
    atomic.write_text(path, ("\n".join(header) + "\n" if header else "") + body)


def apply_best(dataset: str, storage: str = DEFAULT_STORAGE, study_name: str | None = None,
               params_file: str | Path = "conf/base/parameters_tuned.yml") -> dict[str, Any]:
    """Write the best trial's masks to `params_file` under `tuned_masks.<dataset>`; the next
    `dvc repro` sees the parameter change and re-runs pretrain (and what follows)."""
    name = study_name or f"ijepa-masks-{dataset}"
    masks, best = best_masks(storage, name)
    write_tuned_masks(params_file, dataset, masks)
    info = {"dataset": dataset, "study_name": name, "trial": best.number, "value": best.value, "masks": masks,
            "params_file": str(params_file)}
    if "lr" in best.params:
        info["note"] = (f"the best trial also used lr={best.params['lr']:.3g}; tuned_masks holds masks only: "
                        f"set pretrain.{dataset}.optimisation.lr yourself to use it")
    return info


# ---------------------------------------------------------------------------------- CLI
def _read_conf(conf_dirs: Sequence[str | Path]) -> dict[str, Any]:
    """parameters*.yml of the conf folders, later folders overriding earlier ones (as Kedro)."""
    import yaml

    out: dict[str, Any] = {}
    for d in conf_dirs:
        for f in sorted(Path(d).glob("parameters*.yml")):
            out = deep_merge(out, yaml.safe_load(f.read_text()) or {})
    return out


def _dataset_params(conf: Mapping[str, Any], dataset: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pretrain, probe) for `dataset`, resolved like ijepa_kedro.params (common + dataset + tuned)."""
    def section(name: str) -> dict[str, Any]:
        s = conf.get(name) or {}
        if dataset not in s:
            raise ConfigError(f"parameters `{name}` have no block for dataset {dataset!r}")
        return deep_merge(dict(s.get("common") or {}), dict(s[dataset] or {}))

    pre = section("pretrain")
    tuned = (conf.get("tuned_masks") or {}).get(dataset) or {}
    if tuned:
        pre = deep_merge(pre, {"masks": dict(tuned)})
    return pre, section("probe")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ijepa.tune", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("apply-best", help="write the best trial's masks to parameters_tuned.yml (for dvc repro)")
    a.add_argument("--dataset", required=True)
    a.add_argument("--storage", help="Optuna storage URL (default: tune.storage of the conf)")
    a.add_argument("--study", help="study name (default: tune.study_name, else ijepa-masks-<dataset>)")
    a.add_argument("--params-file", default="conf/base/parameters_tuned.yml")
    a.add_argument("--conf", nargs="*", default=["conf/base", "conf/local"])
    w = sub.add_parser("worker", help="join a study as one more worker process")
    w.add_argument("--spec", help="(internal) job spec written by run_study")
    w.add_argument("--index", type=int, default=0)
    w.add_argument("--dataset")
    w.add_argument("--storage")
    w.add_argument("--n-trials", type=int)
    w.add_argument("--shards", help="shard folder (default data/02_shards/<dataset>)")
    w.add_argument("--work-dir", help="trial outputs (default data/07_tune/<dataset>)")
    w.add_argument("--conf", nargs="*", default=["conf/base", "conf/local"])
    s = sub.add_parser("show", help="print the study's trials")
    s.add_argument("--dataset", required=True)
    s.add_argument("--storage")
    s.add_argument("--study")
    s.add_argument("--conf", nargs="*", default=["conf/base", "conf/local"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.cmd == "worker" and args.spec:
        spec = json.loads(Path(args.spec).read_text())
        if spec.get("threads"):
            import torch

            torch.set_num_threads(int(spec["threads"]))
        cfg = load_tune_config(spec["tune"])
        n = args.n_trials if args.n_trials is not None else cfg.n_trials
        _optimize(cfg, spec["base_pretrain"], spec["probe"], spec["shard_dir"], spec["work_dir"], n,
                  spec.get("tracking_uri"), spec.get("parent_run_id"), args.index, spec.get("threads"))
        return 0

    conf = _read_conf([d for d in args.conf if Path(d).is_dir()])
    tune = dict(conf.get("tune") or {})
    if args.cmd == "apply-best":
        info = apply_best(args.dataset, args.storage or tune.get("storage") or DEFAULT_STORAGE,
                          args.study or tune.get("study_name"), args.params_file)
        print(json.dumps(info, indent=2))
        print(f"wrote tuned_masks.{args.dataset} to {args.params_file}; `dvc repro` now re-runs pretrain@"
              f"{args.dataset} and what depends on it")
        return 0
    if args.cmd == "show":
        import optuna

        cfg = load_tune_config({**tune, "dataset": args.dataset, **({"storage": args.storage} if args.storage else {}),
                                **({"study_name": args.study} if args.study else {})})
        study = optuna.load_study(study_name=cfg.name, storage=storage_for(cfg.storage))
        for t in study.trials:
            print(t.number, t.state.name, t.value, t.params, t.user_attrs.get("fail_reason", ""))
        print(json.dumps(study_summary(study, cfg), indent=2, default=str))
        return 0
    # worker joining from the conf (another machine on a shared RDB storage)
    if not args.dataset:
        ap.error("worker needs --dataset (or --spec)")
    over = {"dataset": args.dataset, **({"storage": args.storage} if args.storage else {})}
    cfg = load_tune_config({**tune, **over})
    pre, probe = _dataset_params(conf, args.dataset)
    tracking = None
    parent = None
    if cfg.mlflow:
        import optuna
        import yaml

        mcfg = Path("conf/base/mlflow.yml")
        if mcfg.is_file():
            tracking = ((yaml.safe_load(mcfg.read_text()) or {}).get("server") or {}).get("mlflow_tracking_uri")
        with contextlib.suppress(KeyError):
            parent = optuna.load_study(study_name=cfg.name, storage=storage_for(cfg.storage)).user_attrs.get(PARENT_ATTR)
    _optimize(cfg, pre, probe, args.shards or f"data/02_shards/{args.dataset}",
              args.work_dir or f"data/07_tune/{args.dataset}", args.n_trials if args.n_trials is not None else cfg.n_trials,
              tracking, parent, args.index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
