"""Probe stage: linear / low-shot / count / depth, attentive and kNN probes on the frozen target
encoder (ijepa.probes).

Its MLflow run is the dataset's comparable row: beside the probe metrics it carries the encoder's
pretraining parameters (`pretrain.*`, from encoder.json), the shards as its dataset input, the
encoder as an artifact and the id of the pretrain run that wrote it."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow

from ijepa.export import read_encoder_info
from ijepa.probes import run_probes
from ijepa.tracking import log_shards_input, pretraining_params
from ijepa.viz.probes import family_and_label, plot_confusion, plot_probe_bars
from ijepa.params import probe_mapping

log = logging.getLogger(__name__)
ENCODER_ARTIFACT_MAX_MB = 200  # larger (imported ViT-H ...) encoders are not copied into every probe run


def probe(params: dict[str, Any], dataset: str, encoder: Path, shards: Path, cache: Path
          ) -> tuple[dict, dict, list, dict, Any, Any]:
    cfg = probe_mapping({"probe": params}, dataset)
    # A user may point the probes at any exported encoder instead of this dataset's own
    # (e.g. one written by `ijepa import`), and extract its features on a GPU.
    encoder_path = Path(params.get("encoder_path") or encoder)
    metrics, extras = run_probes(cfg, encoder_path, shards, cache, device=_device(params.get("device")))
    metrics["probes"] = {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                         for name, row in metrics["probes"].items()}
    mlflow.set_tags({"input.encoder_sha256": metrics["encoder_sha256"], "input.encoder_path": str(encoder_path),
                     **_source_tags(encoder_path, metrics.get("input_adaptation"))})
    _comparable_row(encoder_path, Path(shards), metrics["encoder_sha256"])
    table, flat = [], {}
    for name, row in metrics["probes"].items():
        for model, value in row.items():
            if model in ("n_labels", "seeds") or model.endswith("_std"):
                continue
            family, label = family_and_label(name)
            table.append({"probe": name, "family": family, "label": label, "model": model,
                          "top1": round(value, 4), "std": round(row.get(f"{model}_std", 0.0), 4)})
            flat[f"{name}.{model}"] = {"value": value, "step": 0}
            if f"{model}_std" in row:
                flat[f"{name}.{model}_std"] = {"value": row[f"{model}_std"], "step": 0}
    for name, reason in metrics["skipped"].items():
        mlflow.set_tag(f"skipped.{name}", reason)
    bars = plot_probe_bars(metrics, title=f"{dataset}: test top-1, I-JEPA vs baselines")
    if extras.get("confusion") is not None:
        confusion = plot_confusion(extras["confusion"], extras.get("class_names"))
    else:  # no linear probe ran: an explicit empty figure rather than a missing artefact
        import matplotlib.pyplot as plt

        confusion, ax = plt.subplots(figsize=(3, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "linear probe skipped", ha="center")
    return metrics, extras, table, flat, bars, confusion


def _device(name: str | None) -> str:
    """probe.device: cpu (default), cuda, or auto (cuda when available)."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name or "cpu"


def _source_tags(encoder_path: Path, adaptation: dict | None) -> dict[str, str]:
    """Where an imported encoder came from (encoder.json's metadata.source: format, file sha256,
    which encoder of a reference checkpoint) and how the shard images were adapted to it."""
    source = (read_encoder_info(encoder_path).get("metadata") or {}).get("source")
    tags = {f"input.encoder_source.{k}": str(v) for k, v in (source or {}).items()
            if k in ("format", "sha256", "which", "file", "epoch")} if isinstance(source, dict) else {}
    if adaptation:
        tags["input.adaptation"] = (f"{adaptation['from']} -> {adaptation['to']}, resize: {adaptation['resize']}, "
                                    f"replicate channels: {adaptation['replicate_channels']}")
    return tags


def _comparable_row(encoder_path: Path, shards: Path, encoder_sha: str) -> None:
    """What makes the probe run comparable with another in the MLflow compare view: the encoder's
    pretraining parameters next to the probe metrics, its shards and encoder, its pretrain run."""
    params = pretraining_params(read_encoder_info(encoder_path))
    if params:
        mlflow.log_params(params)
    else:
        mlflow.set_tag("pretrain.params", "none: the encoder's encoder.json has no pretraining config (imported?)")
    try:  # tracking extras: a failure here is a warning, never a lost probe result
        log_shards_input(shards, context="probe")
        size_mb = sum(f.stat().st_size for f in encoder_path.glob("encoder.*")) / 2**20
        if size_mb <= ENCODER_ARTIFACT_MAX_MB:
            mlflow.log_artifacts(str(encoder_path), artifact_path="encoder")
        else:
            mlflow.set_tag("encoder_artifact", f"not logged: {size_mb:.0f} MB > {ENCODER_ARTIFACT_MAX_MB} MB")
        run = mlflow.active_run()
        found = mlflow.MlflowClient().search_runs(
            [run.info.experiment_id], f"tags.`output.encoder_sha256` = '{encoder_sha}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            mlflow.set_tag("input.pretrain_run_id", found[0].info.run_id)
    except Exception as err:  # noqa: BLE001
        log.warning("probe run: could not log the shards input / encoder artifact / pretrain run: %s", err)
