"""MAE baseline (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022)
as a first-class pretraining method: ``method: mae`` in `PretrainConfig`.

It runs inside the same trainer as I-JEPA (`ijepa.train.Pretrainer`: data, augmentation,
schedules, AdamW, checkpoints, resume, DDP, tracking, export); `MaePretrainer` only replaces
the method-specific hooks:

  build_modules       the SAME `ViTEncoder` (context encoder of I-JEPA) + `MaeDecoder`
                      (light transformer of timm Blocks) wrapped as one trained module;
                      random patch masks (`RandomMaskGenerator`) instead of multi-block ones
  forward_loss        encoder on the visible patches only (the encoder's `keep` index path),
                      decoder: visible tokens + a mask token at every masked position (both
                      with sin-cos positions) -> pixels of each masked patch; loss = MSE on
                      the MASKED patches only, targets per-patch normalised when
                      ``mae.norm_pix_loss`` (MAE's default)
  ema_update          none (MAE has no target network; the momentum schedule is unused)
  export              the trained encoder itself, with `ijepa.export.save_encoder`, so
                      `ijepa.probes.run_probes` evaluates it unchanged

Masks are `ijepa.masks.Masks` with one "context" list (the visible patches, [1, B, K]) and
one "target" list (the masked patches, [1, B, N - K]), drawn per image from
``make_generator(seed, step)`` over the global batch (so resume and DDP behave as for I-JEPA):
K = int(N * (1 - mask_ratio)) as in the MAE code. Augmentation is the trainer's
RandomResizedCrop, i.e. nothing beyond what I-JEPA uses. Config: ``mae:`` {mask_ratio 0.75,
decoder_dim, decoder_depth, decoder_heads, decoder_mlp_ratio, norm_pix_loss}; the I-JEPA
fields (masks, predictor, loss, EMA momentum) are ignored by this method.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ijepa.masks import Masks
from ijepa.models import EncoderConfig, ViTEncoder, _blocks, _init_weights, _sincos, gather_tokens
from ijepa.train import ENCODER_SUBDIR, Pretrainer, adapt_for_precision
from ijepa.train_config import MaeSection

__all__ = ["MaeSection", "RandomMaskGenerator", "MaeDecoder", "MaePath", "patchify", "mae_loss", "forward_mae",
           "MaePretrainer", "visible_count"]


def visible_count(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per image, as in the MAE code: int(N * (1 - mask_ratio))."""
    return int(num_patches * (1.0 - mask_ratio))


class RandomMaskGenerator:
    """Per-image uniform random masking: [1, B, K] visible and [1, B, N-K] masked indices
    (each sorted), from a torch.Generator (`make_generator(seed, step)`)."""

    def __init__(self, mask_ratio: float, grid: tuple[int, int]):
        self.grid = tuple(grid)
        self.num_patches = grid[0] * grid[1]
        self.keep = visible_count(self.num_patches, mask_ratio)
        if not 1 <= self.keep < self.num_patches:
            raise ValueError(f"mask_ratio {mask_ratio} keeps {self.keep} of {self.num_patches} patches")

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> Masks:
        noise = torch.rand(batch_size, self.num_patches, generator=generator)
        order = noise.argsort(dim=1)
        visible = order[:, :self.keep].sort(dim=1).values
        masked = order[:, self.keep:].sort(dim=1).values
        return Masks(context=visible[None], targets=masked[None], grid=self.grid, target_hw=(0, 0),
                     context_hw=self.grid, context_counts=torch.full((1, batch_size), self.keep, dtype=torch.long))


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C], patches row-major (PatchEmbed's token order)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class MaeDecoder(nn.Module):
    """Light transformer decoder: Linear(D -> d), visible tokens + mask tokens at the masked
    positions (sin-cos positions), timm Blocks, LayerNorm, Linear(d -> p*p*C) per masked patch."""

    def __init__(self, enc: EncoderConfig, cfg: MaeSection):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Linear(enc.embed_dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.register_buffer("pos_embed", _sincos(enc.grid, cfg.decoder_dim).unsqueeze(0), persistent=False)
        self.blocks = _blocks(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.decoder_mlp_ratio, 0.0)
        self.norm = nn.LayerNorm(cfg.decoder_dim)
        self.pred = nn.Linear(cfg.decoder_dim, enc.patch_size ** 2 * enc.in_chans)
        self.apply(_init_weights)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, z: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """z [B, K, D] encoder outputs at `visible` [B, K]; returns pixels [B, M, p*p*C] at `masked` [B, M]."""
        x = self.embed(z)
        pos = self.pos_embed.expand(x.shape[0], -1, -1).to(dtype=x.dtype)
        x = x + gather_tokens(pos, visible)
        queries = self.mask_token.to(dtype=x.dtype) + gather_tokens(pos, masked)
        k = x.shape[1]
        x = torch.cat([x, queries], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x[:, k:]))


class MaePath(nn.Module):
    """Encoder (visible patches only) + decoder: the trained part, wrapped by DDP as one module."""

    def __init__(self, encoder: ViTEncoder, decoder: MaeDecoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, images: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(images, keep=visible)
        return self.decoder(z, visible, masked), z


def mae_loss(pred: torch.Tensor, images: torch.Tensor, masked: torch.Tensor, patch: int,
             norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error over the MASKED patches only (fp32). Targets: the image's pixels
    (as the model sees them, in [0, 1]) of each masked patch, normalised per patch (mean 0,
    variance 1, eps 1e-6) when `norm_pix`."""
    target = gather_tokens(patchify(images.float(), patch), masked)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=True) if target.shape[-1] > 1 else torch.zeros_like(mean)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return F.mse_loss(pred.float(), target)


def forward_mae(path: nn.Module, images: torch.Tensor, masks: Masks, patch: int, norm_pix: bool = True,
                autocast: contextlib.AbstractContextManager | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One MAE forward: (loss, encoder output at the visible patches [B, K, D])."""
    visible, masked = masks.context[0], masks.targets[0]
    with autocast if autocast is not None else contextlib.nullcontext():
        pred, z = path(images, visible, masked)
    return mae_loss(pred, images, masked, patch, norm_pix), z


class MaePretrainer(Pretrainer):
    """`Pretrainer` with the MAE hooks (module docstring); everything else is shared."""

    method_title = "MAE"

    def build_modules(self) -> None:
        enc = self.model_cfg.encoder
        self.encoder = ViTEncoder(enc).to(self.device)
        self.decoder = MaeDecoder(enc, self.cfg.mae).to(self.device)
        for module in (self.encoder, self.decoder):
            adapt_for_precision(module, self.cfg.precision, self.device)
        self.context_path = MaePath(self.encoder, self.decoder)
        self.mask_gen = RandomMaskGenerator(self.cfg.mae.mask_ratio, enc.grid)

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder}

    def eval_encoder(self) -> ViTEncoder:
        return self.encoder

    def forward_loss(self, images: torch.Tensor, masks: Masks) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_mae(self.train_module, images, masks, self.model_cfg.encoder.patch_size,
                           self.cfg.mae.norm_pix_loss, self.autocast)

    def ema_update(self, momentum: float) -> None:
        """No target network in MAE."""

    def export(self) -> Path:
        """The trained encoder (rank 0), in the same format as I-JEPA's target encoder."""
        from ijepa.export import save_encoder

        meta = {"dataset": self.shards.dataset, "manifest_sha256": self.shards.manifest_sha256,
                "shard_dir": str(self.shards.root), "step": self.step, "total_steps": self.total_steps,
                "epochs": self.step / self.steps_per_epoch, "final_loss": self.final_loss(),
                "config": self.cfg.to_dict(), "derived": self.derived(), "source": "ijepa.mae (encoder)"}
        return save_encoder(self.eval_encoder(), self.out_dir / ENCODER_SUBDIR, metadata=meta)

    def derived(self) -> dict[str, Any]:
        out = super().derived()
        out["visible_patches"] = self.mask_gen.keep
        return out
