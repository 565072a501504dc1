"""Shard stage: one source -> WebDataset tars + manifest (ijepa.data does the work)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from ijepa.data import shard_dataset
from ijepa.hashing import file_sha256
from ijepa.viz.samples import plot_samples
from ijepa.params import shard_mapping


def shard(params: dict[str, Any], dataset: str, out_dir: Path) -> tuple[dict, dict, dict, Any]:
    cfg = shard_mapping({"shard": params}, dataset)
    result = shard_dataset(cfg, out_dir, progress=True)
    manifest = result.manifest
    sha = file_sha256(Path(out_dir) / "manifest.json")
    mlflow.set_tag("output.manifest_sha256", sha)
    splits = manifest["splits"]
    summary = {
        "dataset": dataset, "source": manifest["source"], "image_size": manifest["image_size"],
        "channels": manifest["channels"], "manifest_sha256": sha,
        "samples": {s: info["samples"] for s, info in splits.items()},
        "shards": {s: info["num_shards"] for s, info in splits.items()},
        "bytes": {s: info["bytes"] for s, info in splits.items()},
        "skipped": manifest["skipped"], "samples_per_s": round(result.samples_per_s, 1),
        "seconds": round(result.seconds, 2),
    }
    metrics = {"samples_per_s": {"value": result.samples_per_s, "step": 0},
               "samples_total": {"value": float(manifest["samples"]), "step": 0},
               "skipped_total": {"value": float(sum(manifest["skipped"].values())), "step": 0}}
    for s, info in splits.items():
        metrics[f"samples.{s}"] = {"value": float(info["samples"]), "step": 0}
    for reason, n in manifest["skipped"].items():
        metrics[f"skipped.{reason}"] = {"value": float(n), "step": 0}
    names = {k: v["names"] for k, v in manifest["labels"].items() if v.get("names")}
    fig = plot_samples(result.preview, n=len(result.preview), class_names=names,
                       title=f"{dataset}: first samples of the {next(iter(splits))} split")
    return summary, manifest, metrics, fig
