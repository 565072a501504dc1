"""Lineage tags on every MLflow run: git commit, DVC stage and experiment, dataset, pipeline.

kedro-mlflow opens the run in its own before_pipeline_run hook; tags are set at the first
node, when the run is certainly active. Stage-specific hashes (shard manifest, encoder)
are tagged by the nodes that know them. The run also gets the tag `process` (host, pid, start
time), and runs of this experiment left RUNNING by a process that is gone (a killed stage) are
marked KILLED then (ijepa.stale_runs).
"""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

log = logging.getLogger(__name__)


def git_commit(root: Path) -> tuple[str, bool]:
    """(commit sha, dirty?) of the project, or ("unknown", False) outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


class LineageHooks:
    @hook_impl
    def after_context_created(self) -> None:
        # CPU / memory of every stage run (MLflow samples them in a thread while the run is open).
        os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")

    def __init__(self) -> None:
        self._tags: dict[str, str] = {}
        self._tagged = False

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        root = Path(run_params.get("project_path") or os.getcwd())
        sha, dirty = git_commit(root)
        pipeline = run_params.get("pipeline_names") or run_params.get("pipeline_name") or "__default__"
        if isinstance(pipeline, (list, tuple)):
            pipeline = ",".join(pipeline)
        dataset = (run_params.get("runtime_params") or {}).get("dataset", "")
        env = run_params.get("env") or "local"
        self._tags = {
            "git_commit": sha,
            "git_dirty": str(dirty).lower(),
            "kedro_pipeline": str(pipeline),
            "kedro_env": str(env),
            "dataset": str(dataset),
        }
        if env in ("local", "base"):  # dvc.yaml runs the default environment only
            # Same name as the DVC foreach stage that runs this pipeline (dvc.yaml).
            self._tags["dvc_stage"] = f"{pipeline}@{dataset}" if dataset else str(pipeline)
        # `dvc exp run` (also queued): the experiment's name and baseline commit, as `dvc exp show` lists them
        for tag, var in (("dvc_exp", "DVC_EXP_NAME"), ("dvc_exp_baseline", "DVC_EXP_BASELINE_REV")):
            if os.environ.get(var):
                self._tags[tag] = os.environ[var]
        self._tagged = False

    @hook_impl
    def before_node_run(self) -> None:
        if self._tagged:
            return
        import mlflow

        run = mlflow.active_run()
        if run is not None:
            from ijepa.stale_runs import PROCESS_TAG, mark_dead_runs, process_tag

            mlflow.set_tags({**self._tags, PROCESS_TAG: process_tag()})
            self._tagged = True
            try:
                mark_dead_runs(mlflow.MlflowClient(), [run.info.experiment_id], exclude=[run.info.run_id])
            except Exception as err:  # noqa: BLE001 - tidying old runs must never stop a stage
                log.warning("could not check for MLflow runs left RUNNING by killed stages: %s", err)
