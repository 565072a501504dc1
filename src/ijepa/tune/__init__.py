"""Mask-ratio search with Optuna: short pretraining runs scored by a val-split probe, pruned
at checkpoints, on a shared Optuna storage, tracked as nested MLflow runs; the winner handed
to `dvc repro` through conf/base/parameters_tuned.yml.

    run_study(tune_cfg, base_pretrain, probe, shard_dir, work_dir) -> summary dict
    apply_best(dataset, storage=..., study_name=..., params_file=...) -> the masks written

One trial = a point of the search space (`SearchSpace`: target-block scale range, context
scale lower bound, number of target blocks, target aspect range, optionally lr) merged into
the dataset's pretraining parameters, then the library's `run_pretraining` (its own loop,
nothing copied) with `total_steps` / `eval_every` of `TrialSettings`. At every
checkpoint (every `eval_every` steps and at the end) the `on_checkpoint` hook scores the
TARGET encoder with `ijepa.val_probe.ValProbe` (linear or low-shot head, val top-1; the test
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

MLflow, never through `mlflow.start_run` (the process's run stack belongs to kedro-mlflow,
which ends "its" active run): the PARENT is the active run (the kedro-mlflow run of `kedro
run --pipeline tune`), a given run id, or one made with `ijepa.tracking.create_run` (then
also ended here). Each trial gets a CHILD run (`create_run(parent_run_id=...)`, tag
`mlflow.parentRunId`) logged through `ijepa.tracking.MlflowTracker`: trial params
(`trial.*`), the pretraining config, losses, `val_score` at each checkpoint, `objective`,
tag `trial_state` (COMPLETE / PRUNED / FAIL), status FINISHED / KILLED / FAILED. The parent
gets the optimisation-history and parameter-importance PNGs, `best_value`, tags
`best.<param>` and `best_trial.json`.

Modules: `config` (TuneConfig, SearchSpace, TrialSettings), `space` (points <-> masks, a
trial's pretraining parameters), `storage` (Optuna storage with heartbeats, pruner, study),
`objective` (one trial; the only module that imports the training code), `budget` (a
study-wide number of trials shared by workers, exact, surviving dead workers), `workers` (worker processes),
`study` (run_study, summary, parent run, plots), `handoff` (apply_best), `cli`.
"""
from __future__ import annotations

from .cli import main
from .config import DEFAULT_STORAGE, SearchSpace, TrialSettings, TuneConfig, load_tune_config
from .handoff import apply_best, best_masks, write_tuned_masks
from .space import masks_from_params, suggest, trial_pretrain_params
from .storage import open_study, pruner_for, redact, storage_for
from .study import run_study, save_plots, study_summary

__all__ = ["SearchSpace", "TrialSettings", "TuneConfig", "load_tune_config", "run_study", "apply_best",
           "best_masks", "suggest", "masks_from_params", "trial_pretrain_params", "open_study", "storage_for",
           "write_tuned_masks", "DEFAULT_STORAGE", "main", "pruner_for", "redact", "save_plots", "study_summary"]
