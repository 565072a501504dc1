"""What the predictor predicts: decode I-JEPA's predictions of masked target blocks to pixels.

After pretraining, from the final checkpoint (context encoder, predictor, target encoder):

1. a `ijepa.decoder.PatchDecoder` is trained on the first `train_images` train images to map
   the frozen target encoder's patch tokens (layer-normed, the predictor's target space) to
   the patch's pixels;
2. on the first `eval_images` held-out images (`split`, val by default) the project's mask
   generator draws context and target blocks (batches of `batch_size` images, each batch
   its own block sizes, as in training); the method's own forward code gives the target
   features of the blocks (`target_tokens`) and the predictor's predictions of them
   (`ContextPath`); the decoder turns both into pixels;
3. reconstruction errors of the target-block patches (mean squared error per pixel value in
   [0, 1], averaged over patches): decoded target features, decoded predictions, and three
   baselines that need no encoder: the mean train patch; the mean train patch at the same
   grid position (the predictor knows where its targets are: a prediction that only encodes
   the position does no better than this); and the image's own mean context colour (what is
   visible to the predictor, as one flat colour per channel);
4. a figure of the first `images` held-out images (`ijepa.viz.predictions`).

Only the I-JEPA method has a predictor; `skip_reason` says why another method (the MAE
baseline), a disabled config or shards without the held-out split are skipped.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.nn as nn
from matplotlib.figure import Figure

from ijepa.config import from_mapping, require
from ijepa.decoder import DecoderConfig, PatchDecoder, fit_decoder, normed_tokens, patchify, unpatchify
from ijepa.masks import Masks, make_generator
from ijepa.models import ModelConfig, gather_tokens

__all__ = ["VisualiseConfig", "visualise_config", "PredictionReport", "load_ijepa", "skip_reason", "first_images",
           "token_pool", "predict_blocks", "predictions_report", "report_for_checkpoint", "skipped_report",
           "save_report"]

log = logging.getLogger(__name__)

GREY = 0.5  # what hidden patches are filled with in the figure


@dataclass(frozen=True)
class VisualiseConfig:
    """`pretrain.<dataset>.visualise` (conf/base/parameters_pretrain.yml)."""

    enabled: bool = True
    train_images: int = 256      # train images whose target-encoder tokens train the decoder
    eval_images: int = 128       # held-out images for the reconstruction errors
    images: int = 6              # rows of the figure (the first held-out images)
    split: Literal["val", "test"] = "val"
    batch_size: int = 64         # images per forward pass and per mask draw
    seed: int = 0                # the masks drawn on the held-out images
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def validate(self) -> None:
        for name in ("train_images", "eval_images", "images", "batch_size"):
            v = getattr(self, name)
            require(v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        require(self.images <= min(self.eval_images, self.batch_size),
                f"images ({self.images}) must be <= eval_images ({self.eval_images}) and <= batch_size "
                f"({self.batch_size}): the figure shows the first batch's first images")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed!r}")


def visualise_config(raw: Mapping[str, Any] | VisualiseConfig | None) -> VisualiseConfig:
    """The typed config (ConfigError names the field)."""
    return from_mapping(VisualiseConfig, raw, "pretrain.visualise")


def skip_reason(cfg: VisualiseConfig, method: str, splits: Mapping[str, Any]) -> str | None:
    """Why nothing is visualised for this run (None: it is)."""
    if not cfg.enabled:
        return "visualise.enabled is false"
    if method != "ijepa":
        return f"method {method!r} has no predictor (only I-JEPA's predictions are decoded)"
    if cfg.split not in splits:
        return f"the shards have no {cfg.split!r} split (splits: {sorted(splits)})"
    return None


@dataclass
class PredictionReport:
    figure: Figure
    metrics: dict[str, Any]


def load_ijepa(cfg: Any, model: ModelConfig, masker: Any, state: Mapping[str, Any],
               device: torch.device | str = "cpu") -> Any:
    """The I-JEPA method (`ijepa.methods.ijepa.IJepa`) with the checkpoint's context encoder,
    predictor and target encoder, in eval mode."""
    from ijepa.methods.ijepa import IJepa

    method = IJepa(cfg, model, masker, torch.device(device))
    for key, module in method.checkpoint_modules().items():
        if key not in state:
            raise KeyError(f"checkpoint has no {key!r} (keys: {sorted(state)})")
        module.load_state_dict(state[key])
        module.eval()
    return method


def first_images(shard_dir: Any, split: str, n: int) -> torch.Tensor:
    """The first `n` images of `split` (shard order) as float [n, C, H, W] in [0, 1]."""
    from ijepa.data import make_pipeline

    first = list(islice(make_pipeline(shard_dir, split, labels=False, rank=0, world_size=1), n))
    require(len(first) > 0, f"split {split!r} of {shard_dir} holds no images")
    return torch.stack(first).float() / 255.0


@torch.no_grad()
def token_pool(target_encoder: nn.Module, images: torch.Tensor, patch: int, batch_size: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed target tokens [T, D], their patches' pixels [T, p*p*C]) of every patch of `images`."""
    feats, pix = [], []
    for x in images.split(batch_size):
        x = x.to(device)
        feats.append(normed_tokens(target_encoder(x)).flatten(0, 1))
        pix.append(patchify(x, patch).flatten(0, 1))
    return torch.cat(feats), torch.cat(pix)


@torch.no_grad()
def predict_blocks(method: Any, images: torch.Tensor, masks: Masks) -> dict[str, torch.Tensor]:
    """The method's forward on one batch, with pixels gathered in the same order.

    Returns, each [M * nenc * B, Nt, .] in ContextPath's order (target block, context block,
    image): ``targets`` (normed target-encoder features of the blocks), ``predictions``,
    ``pixels`` (the blocks' true patches), ``index`` (their grid positions); ``context_mean`` [M * nenc * B, p*p*C] (each
    image's mean context colour per channel, as a flat patch); and every patch of the images:
    ``tokens`` [B, N, D] (normed target features) and ``patches`` [B, N, p*p*C]."""
    from ijepa.methods.ijepa import target_tokens

    patch, chans = method.model.encoder.patch_size, method.model.encoder.in_chans
    nenc = masks.context.shape[0]
    m, b, nt = masks.targets.shape
    h = method.target_encoder(images)
    targets = target_tokens(h, masks.targets, nenc)
    predictions = method.trained(images, masks.context, masks.targets, masks.context_valid)
    pix = patchify(images, patch)                                   # [B, N, P]
    idx = (masks.targets if nenc == 1 else masks.targets.repeat(1, nenc, 1)).reshape(m * nenc * b, nt)
    pixels = gather_tokens(pix.repeat(m * nenc, 1, 1), idx)
    ctx = gather_tokens(pix.repeat(nenc, 1, 1), masks.context.reshape(nenc * b, -1))  # [nenc*B, Nc, P]
    ctx = ctx.reshape(nenc * b, -1, patch * patch, chans)
    if masks.context_valid is None:
        colour = ctx.mean(dim=(1, 2))                               # [nenc*B, C]
    else:
        w = masks.context_valid.reshape(nenc * b, -1, 1, 1).to(ctx.dtype)
        colour = (ctx * w).sum(dim=(1, 2)) / (w.sum(dim=(1, 2)) * patch * patch)
    context_mean = colour[:, None, :].expand(-1, patch * patch, -1).reshape(nenc * b, -1).repeat(m, 1)
    return {"targets": targets, "predictions": predictions, "pixels": pixels, "index": idx,
            "context_mean": context_mean, "tokens": normed_tokens(h), "patches": pix}


def _panels(images: torch.Tensor, masks: Masks, out: dict[str, torch.Tensor], decoder: PatchDecoder,
            n: int, patch: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The figure's panels for the first `n` images (first context block's predictions) and
    their target-patch masks [n, N]."""
    gh, gw = masks.grid
    chans = images.shape[1]
    m = masks.targets.shape[0]
    pix = patchify(images[:n], patch)                                # [n, N, P]
    grey = torch.full_like(pix, GREY)
    keep = torch.zeros(n, gh * gw, dtype=torch.bool, device=pix.device)
    ctx = masks.context[0, :n]
    valid = torch.ones_like(ctx, dtype=torch.bool) if masks.context_valid is None else masks.context_valid[0, :n]
    for i in range(n):
        keep[i, ctx[i][valid[i]]] = True
    tmask = torch.zeros(n, gh * gw, dtype=torch.bool, device=pix.device)
    dec_t, dec_p = grey.clone(), grey.clone()
    stride = out["predictions"].shape[0] // m  # nenc * B: block k, context block 0, image i at k * stride + i
    for i in range(n):
        for k in range(m):
            pos = masks.targets[k, i]
            tmask[i, pos] = True
            dec_t[i, pos] = decoder(out["targets"][k * stride + i]).clamp(0, 1)
            dec_p[i, pos] = decoder(out["predictions"][k * stride + i]).clamp(0, 1)

    def img(p: torch.Tensor) -> torch.Tensor:
        return unpatchify(p, patch, chans, (gh, gw)).cpu()

    context = torch.where(keep[..., None], pix, grey)
    target = torch.where(tmask[..., None], pix, grey)
    return [img(pix), img(context), img(target), img(dec_t), img(dec_p)], tmask.cpu()


def predictions_report(method: Any, shard_dir: Any, cfg: VisualiseConfig, *, dataset: str = "",
                       step: int | None = None) -> PredictionReport:
    """Train the decoder, decode the predictions of held-out target blocks, measure and plot
    (see the module docstring). `method`: `load_ijepa`'s result."""
    from ijepa.viz.predictions import plot_predictions

    t0 = time.perf_counter()
    enc = method.model.encoder
    patch, chans, device = enc.patch_size, enc.in_chans, method.device
    train = first_images(shard_dir, "train", cfg.train_images)
    feats, pix = token_pool(method.target_encoder, train, patch, cfg.batch_size, device)
    decoder, train_mse = fit_decoder(feats, pix, patch, chans, cfg.decoder)
    mean_patch = pix.mean(dim=0)
    position_mean = pix.reshape(train.shape[0], -1, pix.shape[-1]).mean(dim=0)  # [N, P]: per grid position
    held = first_images(shard_dir, cfg.split, cfg.eval_images)
    sums = {"target_features": 0.0, "predictions": 0.0, "mean_patch": 0.0, "position_mean": 0.0,
            "context_mean": 0.0, "target_features_all_patches": 0.0}
    n_tgt = n_all = 0
    panels = tmask = None
    with torch.no_grad():
        for j, x in enumerate(held.split(cfg.batch_size)):
            x = x.to(device)
            masks = method.masks(x.shape[0], make_generator(cfg.seed, j)).to(device)
            out = predict_blocks(method, x, masks)
            truth = out["pixels"]
            sse = lambda guess: float(((guess - truth) ** 2).sum())  # noqa: E731
            sums["target_features"] += sse(decoder(out["targets"]))
            sums["predictions"] += sse(decoder(out["predictions"]))
            sums["mean_patch"] += sse(mean_patch.expand_as(truth))
            sums["position_mean"] += sse(position_mean[out["index"]])
            sums["context_mean"] += sse(out["context_mean"][:, None, :].expand_as(truth))
            n_tgt += truth.numel()
            sums["target_features_all_patches"] += float(((decoder(out["tokens"]) - out["patches"]) ** 2).sum())
            n_all += out["patches"].numel()
            if j == 0:
                panels, tmask = _panels(x, masks, out, decoder, min(cfg.images, x.shape[0]), patch)
    mse = {k: v / (n_all if k == "target_features_all_patches" else n_tgt) for k, v in sums.items()}
    seconds = time.perf_counter() - t0
    p2c = patch * patch * chans
    metrics = {
        "split": cfg.split, "checkpoint_step": step, "eval_images": int(held.shape[0]),
        "target_patches": n_tgt // p2c, "train_images": int(train.shape[0]), "train_patches": int(pix.shape[0]),
        "decoder_train_mse": train_mse, "mse": mse, "seconds": round(seconds, 2),
    }
    log.info("predictor visualisation (%s, %d %s images, %d target patches): MSE decoded targets %.4f, "
             "decoded predictions %.4f; baselines: mean patch %.4f, mean patch at the position %.4f, context "
             "mean %.4f (%.1fs)", dataset or "?", held.shape[0], cfg.split, metrics["target_patches"],
             mse["target_features"], mse["predictions"], mse["mean_patch"], mse["position_mean"],
             mse["context_mean"], seconds)
    title = f"{dataset + ': ' if dataset else ''}what the predictor predicts ({cfg.split} images" \
            f"{f', step {step}' if step is not None else ''}; decoder trained on target features)"
    return PredictionReport(plot_predictions(panels, tmask, masks.grid, title=title), metrics)


def report_for_checkpoint(plan: Any, state: Mapping[str, Any], cfg: VisualiseConfig,
                          device: torch.device | str = "cpu") -> PredictionReport:
    """`predictions_report` for a `ijepa.trainer.TrainPlan` and a checkpoint dict."""
    method = load_ijepa(plan.cfg, plan.model, plan.masker, state, device)
    return predictions_report(method, plan.shards.root, cfg, dataset=plan.shards.dataset,
                              step=int(state.get("step", -1)))


def skipped_report(reason: str) -> PredictionReport:
    from ijepa.viz.predictions import plot_skipped

    log.info("predictor visualisation skipped: %s", reason)
    return PredictionReport(plot_skipped(reason), {"skipped": reason})


def save_report(report: PredictionReport, png: str | Path, metrics_json: str | Path) -> None:
    """Both files, atomically (for callers outside the Kedro catalog)."""
    from ijepa import atomic
    from ijepa.viz.masks import save_figure_png

    save_figure_png(report.figure, png)
    atomic.write_json(metrics_json, report.metrics)
