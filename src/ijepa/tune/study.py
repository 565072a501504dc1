"""Running a study: validation before any trial, the base-masks trial of a new study, one or
several workers, the summary, and the MLflow parent run with its plots."""
from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

from ijepa import atomic
from ijepa.config import ConfigError
from ijepa.tracking import MlflowTracker, active_run_id, create_run, end_run, resolve_tracking_uri

from .budget import budget_state
from .config import TuneConfig, load_tune_config
from .space import base_point, masks_from_params, space_centre, trial_pretrain_params
from .storage import open_study, redact, storage_for
from .workers import PARENT_ATTR, run_worker, spawn_workers, split_trials, worker_spec

__all__ = ["run_study", "study_summary", "trial_counts", "save_plots"]

log = logging.getLogger("ijepa.tune")


def run_study(tune_cfg: TuneConfig | Mapping[str, Any], base_pretrain: Mapping[str, Any],
              probe: Mapping[str, Any], shard_dir: str | Path, work_dir: str | Path, *,
              parent_run_id: str | None = None, tracking_uri: str | None = None,
              shards_verified: bool = False) -> dict[str, Any]:
    """Run (or continue) the study; returns a JSON-ready summary (see the package docstring).

    `base_pretrain`: the dataset's resolved pretraining parameters (common + dataset +
    tuned masks); `probe`: the dataset's probe parameters. Everything is validated before
    the first trial: the tune config (ConfigError naming the field), the pretraining config
    at a trial's point (so a base that can never work fails here, not in N trials) and the
    shards (their train split's sha256, once for the whole study: the trials do not verify
    again; `shards_verified` when the caller did it already, e.g. Kedro's catalog).
    """
    import optuna

    from ijepa.train_data import read_shard_info

    from .objective import load_config

    cfg = load_tune_config(tune_cfg)
    work_dir = Path(work_dir)
    # Validate what every trial shares before any trial: the merged pretraining config
    # at the centre of the space and the shard folder.
    try:
        load_config(trial_pretrain_params(base_pretrain, cfg, space_centre(cfg.space)))
    except ConfigError as err:
        raise ConfigError(f"tune: the pretraining parameters of a trial are invalid: {err}") from None
    read_shard_info(shard_dir, verify=not shards_verified)
    work_dir.mkdir(parents=True, exist_ok=True)

    threads = max(1, (os.cpu_count() or 1) // cfg.workers) if cfg.workers > 1 else None
    parent: MlflowTracker | None = None
    own_parent = False
    if cfg.mlflow:
        tracking_uri = resolve_tracking_uri(tracking_uri)
        parent, own_parent = _parent_run(cfg, tracking_uri, parent_run_id)
        parent_run_id = parent.run_id
    else:
        parent_run_id = None

    study = open_study(cfg)  # created here once, before any worker starts
    before = len(study.trials)
    if parent_run_id:
        study.set_user_attr(PARENT_ATTR, parent_run_id)
    if cfg.enqueue_base and before == 0:
        point = base_point(base_pretrain, cfg.space)
        if point is not None:
            study.enqueue_trial(point, user_attrs={"enqueued": "base masks"}, skip_if_exists=True)
    log.info("study %s on %s: %d trials so far; adding %s with %d worker(s)", cfg.name, redact(cfg.storage),
             before, cfg.n_trials if cfg.n_trials is not None else f"until {cfg.timeout_s}s", cfg.workers)
    t0 = time.perf_counter()
    status = "FINISHED"
    try:
        if cfg.workers == 1:
            run_worker(cfg, base_pretrain, probe, shard_dir, work_dir, cfg.n_trials, tracking_uri, parent_run_id)
        else:
            # one study-wide budget (exact, survives a dead worker) unless the study runs until a timeout
            target = None if cfg.n_trials is None else budget_state(study.trials).done + cfg.n_trials
            spec = worker_spec(cfg, base_pretrain, probe, shard_dir, work_dir, tracking_uri, parent_run_id, threads,
                               target)
            counts = split_trials(cfg.n_trials, cfg.workers) if target is None else [None] * cfg.workers
            spawn_workers(spec, counts, work_dir, reached=None if target is None else lambda: budget_state(
                optuna.load_study(study_name=cfg.name, storage=storage_for(cfg.storage)).trials).done >= target)
        study = optuna.load_study(study_name=cfg.name, storage=storage_for(cfg.storage))
        summary = study_summary(study, cfg)
        summary.update(trials_added=len(study.trials) - before, seconds=round(time.perf_counter() - t0, 1),
                       parent_run_id=parent_run_id, workers=cfg.workers)
        if parent is not None:
            _report_parent(parent, study, summary, work_dir / cfg.name)
        return summary
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if own_parent and parent is not None:
            end_run(parent, status)


def _parent_run(cfg: TuneConfig, tracking_uri: str | None, parent_run_id: str | None) -> tuple[MlflowTracker, bool]:
    """(the study's parent run, whether we created it).

    The parent is the given run, else the active run (the kedro-mlflow run of `kedro run
    --pipeline tune`), else a new run in experiment `cfg.experiment` (default: the dataset).
    It is never activated with mlflow.start_run (kedro-mlflow owns the run stack); a run
    created here is also terminated here."""
    if parent_run_id:
        return MlflowTracker(parent_run_id, tracking_uri), False
    active = active_run_id()
    if active is not None:
        return MlflowTracker(active, tracking_uri), False
    run = create_run(tracking_uri=tracking_uri, experiment=cfg.experiment or cfg.dataset or "tune",
                     run_name=f"tune-{cfg.name}", tags={"kedro_pipeline": "tune"})
    return run, True


def _report_parent(parent: MlflowTracker, study, summary: dict[str, Any], out_dir: Path) -> None:
    written, skipped = save_plots(study, out_dir)
    for path in written:
        parent.log_artifact(path, "tune")
    for name, why in skipped.items():
        parent.set_tag(f"plot.{name}", f"skipped: {why}")
    parent.set_tag("optuna.study", summary["study_name"])
    parent.set_tag("optuna.storage", summary["storage"])
    parent.log_metrics({f"trials_{state.lower()}": n for state, n in summary["states"].items()}, step=0)
    if summary.get("best_value") is not None:
        parent.log_metrics({"best_value": summary["best_value"]}, step=0)
        parent.set_tag("best_trial", str(summary["best_trial"]))
        for k, v in summary["best_params"].items():
            parent.set_tag(f"best.{k}", str(v))
        best = out_dir / "best_trial.json"
        atomic.write_json(best, {k: summary[k] for k in ("study_name", "best_trial", "best_value", "best_params",
                                                         "best_masks")})
        parent.log_artifact(best, "tune")


def trial_counts(study) -> dict[str, int]:
    """{state name: number of trials}."""
    out: dict[str, int] = {}
    for t in study.trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def study_summary(study, cfg: TuneConfig) -> dict[str, Any]:
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    out: dict[str, Any] = {"study_name": study.study_name, "storage": redact(cfg.storage), "dataset": cfg.dataset,
                           "objective": f"val {cfg.objective} top-1", "n_trials": len(study.trials),
                           "states": trial_counts(study), "best_trial": None, "best_value": None, "best_params": {},
                           "best_masks": {}}
    if complete:
        best = study.best_trial
        out.update(best_trial=best.number, best_value=best.value, best_params=dict(best.params),
                   best_masks=best.user_attrs.get("masks") or masks_from_params(best.params))
    out["failed"] = {t.number: t.user_attrs.get("fail_reason", "") for t in study.trials
                     if t.state == optuna.trial.TrialState.FAIL}
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
