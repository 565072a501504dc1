"""Pretrain stage: I-JEPA on the shards (ijepa.train does the work, resuming from checkpoints)."""
from __future__ import annotations

import logging
import shutil
from itertools import islice
from pathlib import Path
from typing import Any

import mlflow
import torch

from ijepa import checkpoint as ckpt
from ijepa.config import from_mapping
from ijepa.data import make_pipeline
from ijepa.export import file_sha256
from ijepa.masks import MaskGenerator, make_generator
from ijepa.tracking import default_tracker
from ijepa.train import config_differences, run_pretraining
from ijepa.train_config import PretrainConfig, check_against_data
from ijepa.train_data import read_shard_info
from ijepa.viz.masks import plot_masks
from ijepa_kedro.params import pretrain_params

log = logging.getLogger(__name__)


def resolve_config(params: dict[str, Any], tuned: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The validated pretraining config for `dataset` (ConfigError names the field)."""
    cfg = from_mapping(PretrainConfig, pretrain_params(params, tuned, dataset), "pretrain")
    return cfg.to_dict()


def mask_preview(cfg: dict[str, Any], shards: Path, n: int = 6) -> Any:
    """Sample masks drawn over the first train images: what the context and targets cover."""
    cfg_t = from_mapping(PretrainConfig, cfg, "pretrain")
    info = read_shard_info(shards)
    model = check_against_data(cfg_t, info.image_size, info.channels, info.train_samples)
    first = islice(make_pipeline(shards, "train", labels=False, rank=0, world_size=1), n)
    images = torch.stack(list(first))
    masks = MaskGenerator(cfg_t.masks, model.encoder.grid)(images.shape[0], make_generator(cfg_t.seed, 7))
    return plot_masks(images, masks, n=images.shape[0],
                      title=f"{info.dataset}: context (kept) and {cfg_t.masks.npred} target blocks")


def retire_stale_checkpoints(cfg: dict[str, Any], shards: Path, model_dir: Path) -> list[str]:
    """Delete checkpoints that this config cannot resume (other parameters or other shards).

    DVC keeps the checkpoint folder across runs (`persist: true`) so a killed run resumes;
    when a parameter or the data changed, the stage is a new run and starts from scratch.
    Returns the reasons (empty when the checkpoints are resumable or absent)."""
    ckpt_dir = Path(model_dir) / ckpt.CHECKPOINT_SUBDIR
    try:
        found = ckpt.load_latest(ckpt_dir)
    except ckpt.CheckpointError as err:
        found, reasons = None, [str(err)]
    else:
        reasons = []
    if found is not None:
        path, state = found
        reasons = config_differences(state.get("config", {}), cfg)
        sha = read_shard_info(shards).manifest_sha256
        if state.get("manifest_sha256") != sha:
            reasons.append(f"shards changed: checkpoint manifest {state.get('manifest_sha256')}, now {sha}")
    if reasons:
        log.warning("starting pretraining from scratch; removing %s: %s", ckpt_dir, "; ".join(reasons))
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        mlflow.set_tag("retired_checkpoints", "; ".join(reasons)[:5000])
    return reasons


def pretrain(cfg: dict[str, Any], shards: Path, model_dir: Path, reporting_dir: Path) -> tuple[dict, Path]:
    retire_stale_checkpoints(cfg, shards, model_dir)
    summary = run_pretraining(cfg, shards, model_dir, tracker=default_tracker(),
                              loss_csv=Path(reporting_dir) / "pretrain_loss.csv")
    encoder_dir = Path(summary["encoder_dir"])
    sha = file_sha256(encoder_dir / "encoder.safetensors")
    mlflow.set_tags({"input.manifest_sha256": summary["manifest_sha256"], "output.encoder_sha256": sha})
    keep = ("steps", "epochs", "final_loss", "img_per_s", "collapse_warnings", "resumed_from_step",
            "world_size", "global_batch", "precision", "device", "encoder_params", "predictor_params",
            "manifest_sha256")
    report = {k: summary.get(k) for k in keep}
    report["encoder_sha256"] = sha
    return report, encoder_dir
