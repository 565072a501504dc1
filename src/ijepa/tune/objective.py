"""The objective of one trial: draw a point, run the short pretraining with
`run_pretraining` (the library's own loop, nothing copied), score the target encoder on the
val split at every checkpoint, report it to the trial and let the pruner stop the run.

A trial that raises (masks that cannot be sampled on the grid, NaN loss, ...) is recorded
as FAIL with its reason in the trial's user attribute `fail_reason` (and the child run's
tag of the same name); the study goes on. This module imports the training code (torch):
the rest of the package imports it only when trials run.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Mapping

from ijepa.config import deep_merge
from ijepa.tracking import MlflowTracker, NullTracker, Tracker, create_run, end_run
# The one place in the package that names the training module (run_study uses load_config from here).
from ijepa.train_config import load_config
from ijepa.trainer import run_pretraining

from .config import TuneConfig
from .space import masks_from_params, suggest, trial_pretrain_params

__all__ = ["Objective", "load_config"]

log = logging.getLogger("ijepa.tune")

# Optuna trial state -> the MLflow status of its child run
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}  # anything else: FAILED


def start_trial_run(tracking_uri: str | None, parent_run_id: str, number: int, study: str,
                    params: Mapping[str, Any]) -> MlflowTracker:
    """The trial's child run under the study's parent run, with the point as `trial.*` params."""
    return create_run(tracking_uri=tracking_uri, parent_run_id=parent_run_id, run_name=f"trial-{number}",
                      tags={"optuna.study": study, "optuna.trial": str(number), "trial_state": "RUNNING"},
                      params={f"trial.{k}": v for k, v in params.items()})


def end_orphan_trial_runs(study, tracking_uri: str | None, parent_run_id: str) -> list[str]:
    """End the trial runs of this study's parent that were left RUNNING by a killed worker: those
    whose trial Optuna no longer runs (the heartbeat failed it: FAILED; PRUNED: KILLED) and those
    of this host whose process is gone (KILLED). Returns their ids."""
    from mlflow.tracking import MlflowClient

    from ijepa.stale_runs import STALE_TAG, mark_dead_runs, running_runs

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    states = {str(t.number): t.state.name for t in study.get_trials(deepcopy=False)}
    ended = []
    for run in running_runs(client, [exp], f"tags.`mlflow.parentRunId` = '{parent_run_id}'"):
        state = states.get(run.data.tags.get("optuna.trial", ""), "RUNNING")
        if state != "RUNNING":
            client.set_tag(run.info.run_id, STALE_TAG, f"trial is {state} in the study, its run was left RUNNING")
            client.set_tag(run.info.run_id, "trial_state", state)
            client.set_terminated(run.info.run_id, RUN_STATUS.get(state, "FAILED"))
            ended.append(run.info.run_id)
    return ended + mark_dead_runs(client, [exp], exclude=ended)


def finish_trial_run(run: MlflowTracker, state: str, value: float | None = None, reason: str | None = None) -> None:
    with contextlib.suppress(Exception):  # tracking problems must not change the trial's outcome
        if value is not None:
            run.log_metrics({"objective": float(value)}, step=0)
        if reason:
            run.set_tag("fail_reason", reason[:5000])
        run.set_tag("trial_state", state)
        end_run(run, RUN_STATUS.get(state, "FAILED"))


class Objective:
    """`study.optimize(Objective(...))`; the value is the val score at the last step.

    With `parent_run_id` every trial is a child run of it; None: no MLflow runs."""

    def __init__(self, cfg: TuneConfig, base_pretrain: Mapping[str, Any], probe: Mapping[str, Any],
                 shard_dir: str | Path, work_dir: str | Path, tracking_uri: str | None = None,
                 parent_run_id: str | None = None, threads: int | None = None):
        self.cfg, self.base, self.threads = cfg, dict(base_pretrain), threads
        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id
        self.probe_params = deep_merge(dict(probe), dict(cfg.probe_overrides))
        self.shard_dir, self.work_dir = Path(shard_dir), Path(work_dir)
        self._val = None

    def val_probe(self):
        if self._val is None:
            from ijepa.val_probe import ValProbe

            self._val = ValProbe(self.probe_params, self.shard_dir, self.cfg.objective,
                                 self.cfg.max_train, self.cfg.max_val)
        return self._val

    def __call__(self, trial) -> float:
        import optuna
        import torch

        params = suggest(trial, self.cfg.space)
        masks = masks_from_params(params)
        trial.set_user_attr("masks", masks)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who ran it (several machines)
        out = self.work_dir / self.cfg.name / f"trial-{trial.number:05d}"
        if self.parent_run_id:
            with contextlib.suppress(Exception):  # tidying old runs must never fail a trial
                end_orphan_trial_runs(trial.study, self.tracking_uri, self.parent_run_id)
        run = (start_trial_run(self.tracking_uri, self.parent_run_id, trial.number, self.cfg.name, params)
               if self.parent_run_id else None)
        tracker: Tracker = run if run is not None else NullTracker()
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
            if run is not None:
                run.set_tag("pruned", str(err))
                finish_trial_run(run, "PRUNED")
            raise
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            log.warning("trial %d failed: %s", trial.number, reason)
            trial.set_user_attr("fail_reason", reason[:2000])
            if run is not None:
                finish_trial_run(run, "FAIL", reason=reason)
            raise
        except BaseException:  # KeyboardInterrupt, SystemExit: the run did not finish
            if run is not None:
                finish_trial_run(run, "FAIL", reason="interrupted")
            raise
        finally:
            if not self.cfg.trial.keep_checkpoints:
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
        if run is not None:
            finish_trial_run(run, "COMPLETE", value=value)
        trial.set_user_attr("final_loss", summary.get("final_loss"))
        return float(value)
