"""MAE baseline (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022):
``method: mae``, in the same trainer as I-JEPA (data, augmentation, schedules, AdamW,
checkpoints, resume, DDP, tracking, export).

  trained        the SAME `ViTEncoder` as I-JEPA's context encoder + `MaeDecoder` (a light
                 transformer of timm Blocks), as one module
  masks          per-image uniform random masking (`RandomMaskGenerator`) instead of
                 multi-block: one "context" list (the visible patches, [1, B, K]) and one
                 "target" list (the masked patches, [1, B, N - K]); K = int(N * (1 - mask_ratio))
                 as in the MAE code
  loss           encoder on the visible patches only, decoder: visible tokens + a mask token
                 at every masked position (both with sin-cos positions) -> pixels of each
                 masked patch; MSE on the MASKED patches only, targets per-patch normalised
                 when ``norm_pix_loss`` (MAE's default)
  after_step     nothing: MAE has no target network (the momentum schedule is unused)
  export         the trained encoder itself, in the same format as I-JEPA's target encoder

Options (``method_options``): mask_ratio 0.75, decoder_dim, decoder_depth, decoder_heads,
decoder_mlp_ratio, norm_pix_loss. The I-JEPA fields (masks, predictor, loss) are ignored.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ijepa.config import require
from ijepa.masks import Masks
from ijepa.methods.base import Masker, Method
from ijepa.models import (EncoderConfig, ModelConfig, ViTEncoder, _blocks, _init_weights, _sincos, count_params,
                          gather_tokens, run_blocks)
from ijepa.precision import adapt_for_precision

__all__ = ["Mae", "MaeOptions", "RandomMaskGenerator", "MaeDecoder", "MaePath", "patchify", "mae_loss",
           "forward_mae", "visible_count"]


@dataclass(frozen=True)
class MaeOptions:
    """Share of patches masked per image (MAE: 0.75), the light pixel decoder's shape
    (defaults = the tiny preset's predictor), per-patch normalised pixel targets."""

    mask_ratio: float = 0.75
    decoder_dim: int = 96
    decoder_depth: int = 4
    decoder_heads: int = 3
    decoder_mlp_ratio: float = 4.0
    norm_pix_loss: bool = True

    def validate(self) -> None:
        require(0.0 < self.mask_ratio < 1.0, f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.decoder_dim % self.decoder_heads == 0,
                f"decoder_dim {self.decoder_dim} is not divisible by decoder_heads {self.decoder_heads}")
        require(self.decoder_dim % 4 == 0, f"decoder_dim {self.decoder_dim} must be divisible by 4 (2-D sin-cos)")
        require(self.decoder_mlp_ratio > 0, f"decoder_mlp_ratio must be positive, got {self.decoder_mlp_ratio}")


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

    def __init__(self, enc: EncoderConfig, cfg: MaeOptions):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Linear(enc.embed_dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.register_buffer("pos_embed", _sincos(enc.grid, cfg.decoder_dim).unsqueeze(0), persistent=False)
        self.blocks = _blocks(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.decoder_mlp_ratio, 0.0)
        self.norm = nn.LayerNorm(cfg.decoder_dim)
        self.pred = nn.Linear(cfg.decoder_dim, enc.patch_size ** 2 * enc.in_chans)
        self.grad_checkpointing = False  # ijepa.models.set_grad_checkpointing
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
        x = run_blocks(self.blocks, x, None, self.grad_checkpointing)
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


class Mae(Method):
    """Encoder + pixel decoder trained; the encoder itself exported."""

    name = "mae"
    title = "MAE"
    Options = MaeOptions

    @classmethod
    def make_masker(cls, cfg: Any, model: ModelConfig) -> Masker:
        opts = cls.options(cfg.method_options)
        n, grid = model.encoder.num_patches, model.encoder.grid
        keep = visible_count(n, opts.mask_ratio)
        require(1 <= keep < n, f"method_options.mask_ratio: {opts.mask_ratio} on the {grid[0]}x{grid[1]} patch "
                               f"grid leaves {keep} of {n} patches visible; at least 1 must be visible and 1 masked")
        return RandomMaskGenerator(opts.mask_ratio, grid)

    def __init__(self, cfg: Any, model: ModelConfig, masker: Masker, device: torch.device):
        super().__init__(cfg, model, masker, device)
        self.opts: MaeOptions = self.options(cfg.method_options)
        enc = model.encoder
        self.encoder = ViTEncoder(enc).to(device)
        self.decoder = MaeDecoder(enc, self.opts).to(device)
        for module in (self.encoder, self.decoder):
            adapt_for_precision(module, cfg.precision, device)
        self.trained = MaePath(self.encoder, self.decoder)

    def loss(self, module: nn.Module, images: torch.Tensor, masks: Masks,
             autocast: contextlib.AbstractContextManager) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_mae(module, images, masks, self.model.encoder.patch_size, self.opts.norm_pix_loss, autocast)

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder}

    def export_encoder(self) -> ViTEncoder:
        return self.encoder

    def derived(self) -> dict[str, Any]:
        return {"encoder_params": count_params(self.encoder), "decoder_params": count_params(self.decoder),
                "visible_patches": visible_count(self.model.encoder.num_patches, self.opts.mask_ratio)}
