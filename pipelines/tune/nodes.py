"""Tune stage: resolve the dataset's parameters and run the Optuna study (ijepa.tune does the work).

The kedro-mlflow run of this pipeline is the study's parent run; every trial is a child run
(ijepa.tune, DESIGN §6: no nested mlflow.start_run)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ijepa.tune import run_study
from ijepa_kedro.params import for_dataset, pretrain_params


def tune_masks(tune: dict[str, Any], pretrain: dict[str, Any], tuned: dict[str, Any], probe: dict[str, Any],
               dataset: str, shards: Path, tune_dir: Path) -> dict[str, Any]:
    """Run (or continue) the study for `dataset`; returns its summary (best trial, states)."""
    base = pretrain_params(pretrain, tuned, dataset)
    probe_params = for_dataset(probe, dataset, "probe")
    return run_study({**tune, "dataset": dataset}, base, probe_params, shards, tune_dir)
