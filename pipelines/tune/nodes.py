"""Tune stage: resolve the dataset's parameters and run the Optuna study (ijepa.tune does the work).

The kedro-mlflow run of this pipeline is the study's parent run; every trial is a child run
made by ijepa.tune through ijepa.tracking, never with a nested mlflow.start_run (kedro-mlflow
owns the run stack and ends its own run)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ijepa.params import pretrain_mapping, probe_mapping
from ijepa.tune import run_study


def tune_masks(tune: dict[str, Any], pretrain: dict[str, Any], tuned: dict[str, Any], probe: dict[str, Any],
               dataset: str, shards: Path, tune_dir: Path) -> dict[str, Any]:
    """Run (or continue) the study for `dataset`; returns its summary (best trial, states)."""
    base = pretrain_mapping({"pretrain": pretrain, "tuned_masks": tuned}, dataset)
    probe_params = probe_mapping({"probe": probe}, dataset)
    # `shards` was sha256-verified when the catalog loaded it: the study does not verify again
    return run_study({**tune, "dataset": dataset}, base, probe_params, shards, tune_dir, shards_verified=True)
