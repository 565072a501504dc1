"""I-JEPA networks: ViT context/target encoder and the narrow predictor (timm blocks).

Masks are index lists (LongTensor of patch positions), applied with gather: the encoder
adds the fixed 2-D sin-cos positional embedding to every patch *before* gathering, so only
the kept tokens go through the transformer blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from timm.layers import PatchEmbed, build_sincos2d_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block

from ijepa.config import ConfigError, require


@dataclass(frozen=True)
class EncoderConfig:
    """ViT encoder shape. Inputs are float images in [0, 1], normalised inside the model."""

    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 1
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    norm_mean: tuple[float, ...] = (0.5,)
    norm_std: tuple[float, ...] = (0.5,)
    # Imported encoders (ijepa.interop) only; the defaults are our own encoders, unchanged:
    # "sincos": the 2-D sin-cos table is computed from the grid and not saved with the weights;
    # "stored": the table is part of the weights (the reference code's and timm's tables hold
    # the sin-cos channels in another order than timm's build_sincos2d_pos_embed, or are learned).
    pos_embed: Literal["sincos", "stored"] = "sincos"
    norm_eps: float = 1e-5  # LayerNorm eps of the blocks and the final norm (reference code: 1e-6)

    def validate(self) -> None:
        require(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        require(self.img_size % self.patch_size == 0,
                f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        require(self.embed_dim % self.num_heads == 0,
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        require(self.embed_dim % 4 == 0, f"embed_dim {self.embed_dim} must be divisible by 4 (2-D sin-cos)")
        require(0.0 <= self.drop_path < 1.0, f"drop_path must be in [0, 1), got {self.drop_path}")
        for name in ("norm_mean", "norm_std"):
            vals = getattr(self, name)
            require(len(vals) in (1, self.in_chans),
                    f"{name} needs 1 or in_chans={self.in_chans} values, got {len(vals)}")
        require(all(s > 0 for s in self.norm_std), f"norm_std must be positive, got {self.norm_std}")

    @property
    def grid(self) -> tuple[int, int]:
        n = self.img_size // self.patch_size
        return (n, n)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class PredictorConfig:
    """Narrow ViT predictor: its own width and depth (paper: 384 wide at ViT-H)."""

    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    drop_path: float = 0.0

    def validate(self) -> None:
        for name in ("embed_dim", "depth", "num_heads"):
            require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        require(self.embed_dim % self.num_heads == 0,
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        require(self.embed_dim % 4 == 0, f"embed_dim {self.embed_dim} must be divisible by 4 (2-D sin-cos)")


@dataclass(frozen=True)
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)


# Paper shapes (ViT-B/L/H); predictor depth 12 for L/H, width 384 (I-JEPA paper, appendix).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(EncoderConfig(), PredictorConfig()),
    # The default job's CPU model: about 3x fewer FLOPs per token than tiny, so a 2-core laptop
    # CPU without native bf16 pretrains and probes both default datasets in minutes.
    "micro": ModelConfig(EncoderConfig(embed_dim=128, depth=4, num_heads=4),
                         PredictorConfig(embed_dim=64, depth=3, num_heads=4)),
    "vit_b16": ModelConfig(
        EncoderConfig(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                      norm_mean=(0.485, 0.456, 0.406), norm_std=(0.229, 0.224, 0.225)),
        PredictorConfig(embed_dim=384, depth=6, num_heads=12)),
    "vit_l16": ModelConfig(
        EncoderConfig(img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                      norm_mean=(0.485, 0.456, 0.406), norm_std=(0.229, 0.224, 0.225)),
        PredictorConfig(embed_dim=384, depth=12, num_heads=16)),
    "vit_h14": ModelConfig(
        EncoderConfig(img_size=224, patch_size=14, in_chans=3, embed_dim=1280, depth=32, num_heads=16,
                      norm_mean=(0.485, 0.456, 0.406), norm_std=(0.229, 0.224, 0.225)),
        PredictorConfig(embed_dim=384, depth=12, num_heads=16)),
}


def preset(name: str, **encoder_overrides) -> ModelConfig:
    """A named model preset, with encoder fields (img_size, in_chans, ...) overridden."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    enc = replace(cfg.encoder, **encoder_overrides)
    enc.validate()
    return ModelConfig(enc, cfg.predictor)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], idx [B, K] (patch positions) -> [B, K, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _sincos(grid: tuple[int, int], dim: int) -> torch.Tensor:
    # timm's 2-D sin-cos table, flattened row-major to match PatchEmbed's token order.
    pe = build_sincos2d_pos_embed(list(grid), dim=dim, temperature=10000.0)
    return pe.reshape(grid[0] * grid[1], dim).float()


def _key_mask(valid: torch.Tensor | None) -> torch.Tensor | None:
    """[B, K] bool (True = real token) -> SDPA boolean mask [B, 1, 1, K] over keys."""
    if valid is None:
        return None
    return valid[:, None, None, :]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float, drop_path: float,
            norm_eps: float = 1e-5) -> nn.ModuleList:
    rates = torch.linspace(0, drop_path, depth).tolist()
    norm = nn.LayerNorm if norm_eps == 1e-5 else partial(nn.LayerNorm, eps=norm_eps)
    # timm's Attention uses F.scaled_dot_product_attention when available (fused attention).
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=r, norm_layer=norm)
        for r in rates
    )


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
               checkpointing: bool = False) -> torch.Tensor:
    """The blocks in turn; with `checkpointing` (and grad enabled) each block's activations are
    recomputed in the backward pass instead of kept (torch.utils.checkpoint, non-reentrant: the
    RNG state of drop_path is replayed, so the gradients are those of the plain pass)."""
    for blk in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, attn_mask=attn_mask, use_reentrant=False)
        else:
            x = blk(x, attn_mask=attn_mask)
    return x


def set_grad_checkpointing(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Activation checkpointing on or off in every block stack of `module` (ViTEncoder,
    Predictor, the MAE decoder); not part of the weights or of encoder.json."""
    for m in module.modules():
        if hasattr(m, "grad_checkpointing"):
            m.grad_checkpointing = bool(enabled)
    return module


class ViTEncoder(nn.Module):
    """ViT without class token; fixed sin-cos positions (or a stored table); final LayerNorm."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        # persistent (in the state dict, loaded with the weights) only for cfg.pos_embed == "stored"
        self.register_buffer("pos_embed", _sincos(cfg.grid, cfg.embed_dim).unsqueeze(0),
                             persistent=cfg.pos_embed == "stored")
        mean = torch.tensor(cfg.norm_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(cfg.norm_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("norm_mean", mean, persistent=False)
        self.register_buffer("norm_std", std, persistent=False)
        self.blocks = _blocks(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.drop_path, cfg.norm_eps)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.grad_checkpointing = False  # set_grad_checkpointing
        self.apply(_init_weights)
        self._rescale_blocks()

    def _rescale_blocks(self) -> None:
        # Reference-code habit: shrink residual projections with depth for stable deep nets.
        for i, blk in enumerate(self.blocks, start=1):
            blk.attn.proj.weight.data.div_((2.0 * i) ** 0.5)
            blk.mlp.fc2.weight.data.div_((2.0 * i) ** 0.5)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Float images [B, C, H, W] in [0, 1] -> patch tokens with positions [B, N, D]."""
        if images.shape[1:] != (self.cfg.in_chans, self.cfg.img_size, self.cfg.img_size):
            raise ValueError(
                f"encoder expects images of shape (C, H, W) = "
                f"({self.cfg.in_chans}, {self.cfg.img_size}, {self.cfg.img_size}), got {tuple(images.shape[1:])}")
        x = (images - self.norm_mean) / self.norm_std
        return self.patch_embed(x) + self.pos_embed.to(dtype=x.dtype)

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None,
                keep_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Encode; `keep` [B, K] restricts the blocks to those patch positions.

        `keep_valid` [B, K] (bool) marks real entries when lists of different lengths were
        padded to K: padded tokens are never attended to, so each image's valid outputs are
        exactly those of its unpadded list.
        """
        x = self.embed(images)
        if keep is not None:
            x = gather_tokens(x, keep)
        x = run_blocks(self.blocks, x, _key_mask(keep_valid), self.grad_checkpointing)
        return self.norm(x)

    @torch.no_grad()
    def features(self, images: torch.Tensor, n_last: int = 1) -> torch.Tensor:
        """Average-pooled patch features for probes: last layer, or the last `n_last` layers
        (each through the final LayerNorm) concatenated, as in the paper's evaluation."""
        require(1 <= n_last <= self.cfg.depth, f"n_last must be in [1, depth={self.cfg.depth}], got {n_last}")
        x = self.embed(images)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= self.cfg.depth - n_last:
                outs.append(self.norm(x).mean(dim=1))
        return torch.cat(outs, dim=-1)


class Predictor(nn.Module):
    """Narrow ViT: context tokens + mask tokens at target positions -> target representations."""

    def __init__(self, enc: EncoderConfig, cfg: PredictorConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Linear(enc.embed_dim, cfg.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.register_buffer("pos_embed", _sincos(enc.grid, cfg.embed_dim).unsqueeze(0), persistent=False)
        self.blocks = _blocks(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.drop_path)
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, enc.embed_dim)
        self.grad_checkpointing = False  # set_grad_checkpointing
        self.apply(_init_weights)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, ctx: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor,
                ctx_valid: torch.Tensor | None = None) -> torch.Tensor:
        """ctx [B, Nc, D] at positions ctx_idx [B, Nc]; tgt_idx [M, B, Nt] (M target blocks).

        `ctx_valid` [B, Nc] (bool) marks real context entries when lists were padded.
        Returns predictions [M * B, Nt, D], block-major (block m of image b at m * B + b).
        """
        m, b, nt = tgt_idx.shape
        x = self.embed(ctx)
        pos = self.pos_embed.expand(b, -1, -1).to(dtype=x.dtype)
        x = x + gather_tokens(pos, ctx_idx)
        nc = x.shape[1]
        # One predictor pass per target block, batched: repeat the context M times.
        x = x.repeat(m, 1, 1)
        tgt_flat = tgt_idx.reshape(m * b, nt)
        tgt_pos = gather_tokens(pos.repeat(m, 1, 1), tgt_flat)
        queries = self.mask_token.to(dtype=x.dtype) + tgt_pos
        x = torch.cat([x, queries], dim=1)
        attn_mask = None
        if ctx_valid is not None:
            valid = torch.cat([ctx_valid.repeat(m, 1),
                               torch.ones(m * b, nt, dtype=torch.bool, device=ctx_valid.device)], dim=1)
            attn_mask = _key_mask(valid)
        x = run_blocks(self.blocks, x, attn_mask, self.grad_checkpointing)
        x = self.norm(x[:, nc:])
        return self.proj(x)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__: Sequence[str] = [
    "EncoderConfig", "PredictorConfig", "ModelConfig", "PRESETS", "preset", "gather_tokens",
    "ViTEncoder", "Predictor", "count_params", "run_blocks", "set_grad_checkpointing",
]
