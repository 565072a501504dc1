"""Experiment tracking behind a small interface, so the library never depends on MLflow.

- `Tracker`: the protocol the training loop talks to (metrics, params, tags, artifacts).
- `NullTracker`: does nothing (tests, runs without tracking).
- `RecordingTracker`: keeps everything in memory (tests, replay).
- `MlflowTracker`: logs to one MLflow run through `MlflowClient` (it never starts or ends
  runs, so it does not disturb the caller's run stack, e.g. kedro-mlflow's). Built from the
  active run (`MlflowTracker.active()`), or from ``MLFLOW_RUN_ID`` / ``MLFLOW_TRACKING_URI``
  in torchrun child processes (`tracker_from_env(rank)`: rank 0 only, others get a
  NullTracker). `run_env()` gives the variables a parent passes to its children.
- `create_run` / `end_run`: a run made with `MlflowClient` (optionally the child of a parent
  run) and terminated with a status, for callers that own runs outside the fluent run stack
  (the Optuna study: one parent run, one child run per trial). `active_run_id()` and
  `resolve_tracking_uri()` read the caller's MLflow state without changing it.
- `log_shards_input`: the shards as a run's dataset input; `pretraining_params`: an encoder's
  pretraining parameters as `pretrain.*` params (the probe run: one comparable row per run).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

__all__ = ["Tracker", "NullTracker", "RecordingTracker", "MlflowTracker", "tracker_from_env",
           "flatten_params", "default_tracker",
           "create_run", "end_run", "active_run_id", "resolve_tracking_uri", "RUN_STATUSES",
           "log_shards_input", "pretraining_params"]

log = logging.getLogger(__name__)

ENV_RUN_ID = "MLFLOW_RUN_ID"
ENV_URI = "MLFLOW_TRACKING_URI"
PARENT_TAG = "mlflow.parentRunId"  # how the MLflow UI nests a child run under its parent
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


@runtime_checkable
class Tracker(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tag(self, key: str, value: Any) -> None: ...

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...


class NullTracker:
    """Accepts everything, records nothing."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tag(self, key: str, value: Any) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass


class RecordingTracker:
    """Keeps metrics [(step, dict)], params, tags and artifact paths in memory."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.params: dict[str, Any] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[str, str | None]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.metrics.append((int(step), {k: float(v) for k, v in metrics.items()}))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(flatten_params(params))

    def set_tag(self, key: str, value: Any) -> None:
        self.tags[key] = str(value)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(s, m[name]) for s, m in self.metrics if name in m]


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b.c": "value"} with lists rendered as strings."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key + "."))
        else:
            out[key] = str(list(v) if isinstance(v, tuple) else v)
    return out


class MlflowTracker:
    """Logs to an existing MLflow run (by id) with MlflowClient; never starts/ends runs."""

    def __init__(self, run_id: str, tracking_uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)

    @classmethod
    def active(cls) -> "MlflowTracker":
        import mlflow

        run = mlflow.active_run()
        if run is None:
            raise RuntimeError("MlflowTracker.active(): no active MLflow run")
        return cls(run.info.run_id, mlflow.get_tracking_uri())

    def run_env(self) -> dict[str, str]:
        """Environment variables that let a child process attach to this run."""
        env = {ENV_RUN_ID: self.run_id}
        if self.tracking_uri:
            env[ENV_URI] = str(self.tracking_uri)
        return env

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        # a buffered point keeps the time it was logged, not the time it was sent
        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        batch = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        flat = flatten_params(params)
        try:
            existing = self.client.get_run(self.run_id).data.params
        except MlflowException:
            existing = {}
        new = [Param(k, v[:6000]) for k, v in flat.items() if k not in existing]
        for k, v in flat.items():
            if k in existing and existing[k] != v[:6000]:
                log.warning("MLflow run %s already has param %s=%r; not overwriting with %r",
                            self.run_id, k, existing[k], v)
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def set_tag(self, key: str, value: Any) -> None:
        self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)


def tracker_from_env(rank: int = 0) -> Tracker:
    """In a torchrun child: an MlflowTracker on MLFLOW_RUN_ID for rank 0, else NullTracker."""
    run_id = os.environ.get(ENV_RUN_ID)
    if rank != 0 or not run_id:
        return NullTracker()
    return MlflowTracker(run_id, os.environ.get(ENV_URI))


def default_tracker() -> Tracker:
    """MlflowTracker on the active run when one is active (and mlflow imports), else NullTracker."""
    try:
        import mlflow
    except ImportError:  # pragma: no cover
        return NullTracker()
    if mlflow.active_run() is None:
        return NullTracker()
    return MlflowTracker.active()


def active_run_id() -> str | None:
    """The id of the caller's active MLflow run (e.g. kedro-mlflow's), None when there is none."""
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """`tracking_uri`, else the one MLflow would use now (MLFLOW_TRACKING_URI, set_tracking_uri, ...)."""
    import mlflow

    return tracking_uri or mlflow.get_tracking_uri()


def create_run(*, tracking_uri: str | None = None, experiment: str | None = None, parent_run_id: str | None = None,
               run_name: str | None = None, tags: Mapping[str, Any] | None = None,
               params: Mapping[str, Any] | None = None) -> MlflowTracker:
    """Create a RUNNING MLflow run and return an `MlflowTracker` on it; end it with `end_run`.

    With `parent_run_id` the run is that run's child (tag ``mlflow.parentRunId``), in the
    parent's experiment unless `experiment` is given; otherwise it goes to the experiment
    named `experiment` (created when missing). `params` are logged as by
    `MlflowTracker.log_params`.

    The run is made with `MlflowClient.create_run` and never activated: `mlflow.start_run`
    would push it onto the process's fluent run stack, which belongs to the caller (e.g.
    kedro-mlflow ends "its" active run at the end of the pipeline).
    """
    from mlflow.tracking import MlflowClient

    from ijepa.stale_runs import PROCESS_TAG, process_tag

    client = MlflowClient(tracking_uri=tracking_uri)
    # who writes the run: a later start ends it when this process is killed (ijepa.stale_runs)
    all_tags = {PROCESS_TAG: process_tag(), **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    if experiment is None:
        if not parent_run_id:
            raise ValueError("create_run needs an experiment name or a parent run")
        experiment_id = client.get_run(parent_run_id).info.experiment_id
    else:
        exp = client.get_experiment_by_name(experiment)
        experiment_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    tracker = MlflowTracker(run.info.run_id, tracking_uri)
    if params:
        tracker.log_params(params)
    return tracker


def end_run(tracker: MlflowTracker, status: str = "FINISHED") -> None:
    """Terminate the tracker's run with `status` (FINISHED, FAILED or KILLED); meant for runs
    this process created with `create_run`, not for a caller's active run."""
    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
    tracker.client.set_terminated(tracker.run_id, status)


def log_shards_input(shard_dir: str | os.PathLike, context: str) -> None:
    """The shard folder as the active run's dataset input (`mlflow.log_input`): name
    "<dataset>-shards", digest = the start of manifest.json's sha256, the per-split sample counts
    as the input's tag `samples`; so the UI's Datasets column shows which shards a run read."""
    import json
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from ijepa.hashing import file_sha256

    root = Path(shard_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    name = f"{manifest.get('dataset') or root.name}-shards"
    with warnings.catch_warnings():  # a local folder fits two of MLflow's equivalent local sources
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(root.resolve().as_uri())
    ds = MetaDataset(source, name=name, digest=file_sha256(root / "manifest.json")[:32])
    counts = {s: info.get("samples") for s, info in (manifest.get("splits") or {}).items()}
    mlflow.log_input(ds, context=context, tags={"samples": json.dumps(counts)})


def pretraining_params(encoder_info: Mapping[str, Any]) -> dict[str, str]:
    """The pretraining parameters of an exported encoder (its encoder.json's metadata: the
    resolved PretrainConfig and the steps it ran) as flat `pretrain.*` params, so a probe run
    can be compared by what its encoder was trained with; {} for encoders without them (imported)."""
    meta = encoder_info.get("metadata") or {}
    cfg = meta.get("config")
    if not isinstance(cfg, Mapping):
        return {}
    keep = {k: cfg[k] for k in ("method", "model", "masks", "optimisation", "loss", "seed", "precision")
            if k in cfg}
    if meta.get("step") is not None:
        keep["steps"] = meta["step"]
    if meta.get("dataset"):
        keep["dataset"] = meta["dataset"]
    enc = encoder_info.get("encoder") or {}
    keep["encoder"] = {k: enc[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads") if k in enc}
    # unset fields (a preset decides them, and `pretrain.encoder.*` says what it decided) stay out
    return {k: v for k, v in flatten_params(keep, "pretrain.").items() if v != "None"}
