"""A patch decoder: the pixels of each patch from its frozen target-encoder feature.

Used to *see* what the predictor predicts (``ijepa.predictions``): the decoder learns, on
train images, to map the target encoder's patch tokens back to the patch's pixels; applied
to the predictor's outputs for masked target blocks it turns predicted representations
into pixels (the I-JEPA paper does the same with a generative decoder).

Choices, and why:

- Input: the target encoder's output layer-normed over the feature dimension without an
  affine (`ijepa.methods.ijepa.target_tokens`): the space the predictor regresses into, so
  one decoder reads both true target features and predictions.
- Per-token MLP (Linear, GELU, Linear): each patch is decoded from its own token only, so a
  decoded prediction shows what the predicted token holds, not what a decoder infers from
  neighbouring tokens.
- Pixel targets in the image's [0, 1] space (not per-patch normalised, as MAE's
  norm_pix_loss): decoded patches are shown as they are; per-patch normalised targets would
  need each patch's true mean and std to be displayed, which would leak the ground truth
  into the decoded predictions. Mean squared errors are then per pixel value in [0, 1].
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ijepa.config import require
from ijepa.methods.mae import patchify

__all__ = ["DecoderConfig", "PatchDecoder", "patchify", "unpatchify", "normed_tokens", "fit_decoder",
           "decode_mse"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderConfig:
    """The patch decoder and its training (AdamW, cosine-decayed learning rate, MSE)."""

    hidden: int = 256          # width of the MLP's hidden layer
    steps: int = 300           # optimiser steps
    batch_size: int = 256      # patches per step, drawn with replacement from the training pool
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def validate(self) -> None:
        for name in ("hidden", "steps", "batch_size"):
            v = getattr(self, name)
            require(v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be positive, got {self.lr!r}")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                f"weight_decay must be >= 0, got {self.weight_decay!r}")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed!r}")


class PatchDecoder(nn.Module):
    """Token [.., D] -> the patch's pixels [.., p*p*C] (patchify's layout), per token."""

    def __init__(self, dim: int, patch_size: int, channels: int, hidden: int = 256):
        super().__init__()
        self.patch_size, self.channels = patch_size, channels
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, patch_size * patch_size * channels))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)


def unpatchify(patches: torch.Tensor, patch: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """[B, N, p*p*C] (patchify's layout, N = grid rows x cols row-major) -> [B, C, H, W]."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * patch, gw * patch)


def normed_tokens(h: torch.Tensor) -> torch.Tensor:
    """Encoder output [.., D] -> layer norm without affine: the predictor's target space
    (as `ijepa.methods.ijepa.target_tokens` before its gather)."""
    return F.layer_norm(h, (h.shape[-1],))


def fit_decoder(features: torch.Tensor, pixels: torch.Tensor, patch_size: int, channels: int,
                cfg: DecoderConfig) -> tuple[PatchDecoder, float]:
    """Train a `PatchDecoder` on (features [T, D], pixels [T, p*p*C]) token pairs.

    Returns the decoder (eval mode, on the features' device) and its mean training MSE over
    the last tenth of the steps."""
    require(features.ndim == 2 and pixels.ndim == 2 and features.shape[0] == pixels.shape[0] > 0,
            f"features [T, D] and pixels [T, P] with the same T > 0 expected, got {tuple(features.shape)} "
            f"and {tuple(pixels.shape)}")
    require(pixels.shape[1] == patch_size * patch_size * channels,
            f"pixels hold {pixels.shape[1]} values per patch, patch_size {patch_size} x channels {channels} "
            f"needs {patch_size * patch_size * channels}")
    threads = torch.get_num_threads()
    if features.device.type == "cpu":
        # One intra-op thread: at these sizes (a [256, 128] x [128, 256] matmul per layer) a second
        # thread saves little on an idle CPU, and on a busy one the threads' spin-waits cost 10x
        # (measured on 2 loaded cores: 100 steps 0.5 CPU-s on one thread, 5.6 CPU-s on two).
        torch.set_num_threads(1)
    try:
        return _fit(features, pixels, patch_size, channels, cfg)
    finally:
        torch.set_num_threads(threads)


def _fit(features: torch.Tensor, pixels: torch.Tensor, patch_size: int, channels: int,
         cfg: DecoderConfig) -> tuple[PatchDecoder, float]:
    torch.manual_seed(cfg.seed)
    device = features.device
    decoder = PatchDecoder(features.shape[1], patch_size, channels, cfg.hidden).to(device)
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    tail = max(1, cfg.steps // 10)
    losses = []
    t0 = time.perf_counter()
    decoder.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, features.shape[0], (cfg.batch_size,), generator=g).to(device)
        loss = F.mse_loss(decoder(features[idx]), pixels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= cfg.steps - tail:
            losses.append(loss.detach())
    train_mse = float(torch.stack(losses).mean())
    dt = time.perf_counter() - t0
    log.info("patch decoder: %d steps x %d patches in %.1fs (%.0f steps/s), train MSE %.4f",
             cfg.steps, cfg.batch_size, dt, cfg.steps / max(dt, 1e-9), train_mse)
    return decoder.eval(), train_mse


@torch.no_grad()
def decode_mse(decoder: nn.Module, features: torch.Tensor, pixels: torch.Tensor) -> float:
    """Mean squared error (per pixel value, averaged over patches) of the decoded `features`
    [.., D] against `pixels` [.., p*p*C]."""
    return float(F.mse_loss(decoder(features), pixels))
