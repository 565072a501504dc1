"""Pretrain stage: the library's trainer on the shards (ijepa.trainer), resuming from checkpoints;
then what the predictor predicts, decoded to pixels from the final checkpoint (ijepa.predictions)."""
from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path
from typing import Any

import mlflow
import torch

from ijepa import checkpoint as ckpt
from ijepa.data import load_manifest, make_pipeline
from ijepa.distributed import pick_device
from ijepa.export import file_sha256
from ijepa.masks import make_generator
from ijepa.params import pretrain_mapping, visualise_mapping
from ijepa.predictions import VisualiseConfig, report_for_checkpoint, skip_reason, skipped_report, visualise_config
from ijepa.tracking import default_tracker, log_shards_input
from ijepa.trainer import TrainPlan, prepare, retire_stale_checkpoints, train
from ijepa.viz.masks import plot_masks


def plan_pretraining(params: dict[str, Any], tuned: dict[str, Any], dataset: str, shards: Path
                     ) -> tuple[TrainPlan, VisualiseConfig]:
    """Every parameter checked against this data before any work (ConfigError names the
    field), the predictor visualisation's too. `shards` was sha256-verified when the catalog
    loaded it, so not again here."""
    plan = prepare(pretrain_mapping({"pretrain": params, "tuned_masks": tuned}, dataset), shards, verify=False)
    return plan, visualise_config(visualise_mapping({"pretrain": params}, dataset))


def mask_preview(plan: TrainPlan, n: int = 6) -> Any:
    """Sample masks drawn over the first train images: what the context and targets cover."""
    first = islice(make_pipeline(plan.shards.root, "train", labels=False, rank=0, world_size=1), n)
    images = torch.stack(list(first))
    masks = plan.masker(images.shape[0], make_generator(plan.cfg.seed, 7))
    what = f"{plan.cfg.masks.npred} target blocks" if plan.cfg.method == "ijepa" else "masked patches"
    return plot_masks(images, masks, n=images.shape[0], title=f"{plan.shards.dataset}: context (kept) and {what}")


def pretrain(plan: TrainPlan, model_dir: Path, reporting_dir: Path) -> tuple[dict, Path]:
    tracker = default_tracker()
    retire_stale_checkpoints(plan.cfg, plan.shards.manifest_sha256, model_dir, tracker)
    summary = train(plan, model_dir, tracker=tracker, loss_csv=Path(reporting_dir) / "pretrain_loss.csv",
                    probes_csv=Path(reporting_dir) / "pretrain_probes.csv")
    encoder_dir = Path(summary["encoder_dir"])
    sha = file_sha256(encoder_dir / "encoder.safetensors")
    mlflow.set_tags({"input.manifest_sha256": summary["manifest_sha256"], "output.encoder_sha256": sha})
    # The exported encoder as a run artifact (README: load it with one line from the UI's run id):
    # ijepa.load_encoder(mlflow.artifacts.download_artifacts(run_id=RUN_ID, artifact_path="encoder"))
    mlflow.log_artifacts(str(encoder_dir), artifact_path="encoder")
    try:  # the shards as the run's dataset input (UI: Datasets); tracking extras never fail the stage
        log_shards_input(plan.shards.root, context="pretrain")
    except Exception as err:  # noqa: BLE001
        logging.getLogger(__name__).warning("pretrain run: could not log the shards as dataset input: %s", err)
    keep = ("steps", "epochs", "final_loss", "img_per_s", "collapse_warnings", "resumed_from_step",
            "world_size", "global_batch", "precision", "device", "encoder_params", "predictor_params",
            "manifest_sha256")
    report = {k: summary.get(k) for k in keep}
    report["encoder_sha256"] = sha
    report["export"] = summary.get("export")
    report["exported_step"] = summary.get("exported_step")
    if summary.get("probes"):  # probes along training (val split): last and best scores
        p = summary["probes"]
        report["probes_along_training"] = {k: p.get(k) for k in (
            "score", "last_step", "last_knn_top1", "last_linear_top1", "best_step", "best_score")}
    return report, encoder_dir


def visualise_predictions(plan: TrainPlan, viz: VisualiseConfig, model_dir: Path, summary: dict) -> tuple[Any, dict]:
    """What the predictor predicts (ijepa.predictions), from the final checkpoint: the figure
    and the held-out reconstruction errors; for the MAE baseline (no predictor), a disabled
    config or shards without the held-out split, a placeholder saying why."""
    reason = skip_reason(viz, plan.cfg.method, load_manifest(plan.shards.root)["splits"])
    if reason is not None:
        report = skipped_report(reason)
        return report.figure, report.metrics
    found = ckpt.load_latest(Path(model_dir) / ckpt.CHECKPOINT_SUBDIR)
    if found is None or int(found[1]["step"]) != int(summary["steps"]):
        raise ckpt.CheckpointError(f"{model_dir}: no checkpoint of the final step {summary['steps']} to visualise "
                                   f"(found {found[0] if found else 'none'})")
    report = report_for_checkpoint(plan, found[1], viz, device=pick_device(0, plan.cfg.device))
    try:  # the errors as run metrics too (UI: compare runs); tracking extras never fail the stage
        default_tracker().log_metrics({f"predictor_viz.mse.{k}": v for k, v in report.metrics["mse"].items()},
                                      step=int(summary["steps"]))
    except Exception as err:  # noqa: BLE001
        logging.getLogger(__name__).warning("pretrain run: could not log the predictor visualisation metrics: %s", err)
    return report.figure, report.metrics
