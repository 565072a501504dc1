"""What every layout shares: the canonical state dict, shapes read from it, safe file loading.

The canonical state dict holds a ViT encoder under timm's names, which are also the
reference code's and ours (`ijepa.models.ViTEncoder`)::

    patch_embed.proj.{weight,bias}  pos_embed [1, N, D]
    blocks.{i}.norm1  .attn.qkv  .attn.proj  .norm2  .mlp.fc1  .mlp.fc2   (weight, bias)
    norm.{weight,bias}

Each layout module converts its own names to and from these; `encoder_config` reads the
shapes from them and `build_encoder` loads them into a `ViTEncoder` with the positional table
taken from the weights (`pos_embed: stored`), never rebuilt.
"""
from __future__ import annotations

import logging
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from ijepa.config import ConfigError
from ijepa.models import EncoderConfig, ViTEncoder

__all__ = ["InteropError", "IMAGENET_MEAN", "IMAGENET_STD", "KNOWN_HEADS", "EXPECTED", "load_torch",
           "load_safetensors", "strip_prefix", "encoder_config", "build_encoder", "canonical_state", "check_blocks",
           "tensors"]

log = logging.getLogger(__name__)

# The reference code normalises images with ImageNet's mean and std (src/transforms.py), and so
# do timm's and Hugging Face's I-JEPA configs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Attention heads cannot be read from the weights: the standard ViT widths and theirs.
# 1280 (ViT-H) and 1408 (ViT-g) are the released I-JEPA encoders, both with 16 heads.
KNOWN_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
EXPECTED = ("an I-JEPA checkpoint of the reference code (.pth.tar: a dict with 'target_encoder' and "
            "'encoder'), a timm I-JEPA ViT state dict (.pth or .safetensors), or a Hugging Face "
            "I-JEPA folder (config.json + model.safetensors)")
_BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


class InteropError(ValueError):
    """A file cannot be imported or exported; the message names the file and what was expected."""


def load_torch(path: Path, trust_pickle: bool = False) -> Any:
    """`torch.load` with `weights_only=True` (tensors and plain containers only: no code runs),
    memory-mapped so that the optimiser state of a large checkpoint is not read into memory.
    `trust_pickle=True` unpickles anything: only for files from a trusted source."""
    if not zipfile.is_zipfile(path):
        raise InteropError(f"{path}: not a torch.save checkpoint (no zip archive: truncated, corrupt or "
                           f"another kind of file); expected {EXPECTED}")
    if trust_pickle:
        log.warning("%s: loading with weights_only=False (--trust-pickle): its pickled code runs", path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "global" in str(err).lower() and not trust_pickle:
            raise InteropError(
                f"{path}: torch.load(weights_only=True) refused it ({first}): the file holds Python objects "
                f"besides tensors and plain containers. Only if you trust where it came from, re-run with "
                f"--trust-pickle (trust_pickle=True), which unpickles it and runs whatever code it names") from None
        raise InteropError(f"{path}: cannot unpickle the checkpoint ({first}); expected {EXPECTED}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise InteropError(f"{path}: cannot read the checkpoint, truncated or corrupt? "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise InteropError(f"{path}: not a readable safetensors file, truncated or corrupt? ({err})") from None


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """`state` with `prefix` removed from its names when every name carries it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def tensors(state: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InteropError(f"{where}: expected a state dict (parameter names -> tensors); "
                           f"got {type(state).__name__}; expected {EXPECTED}")
    return dict(state)


def encoder_config(state: Mapping[str, torch.Tensor], where: str, *, num_heads: int | None = None,
                   norm_eps: float = 1e-6, mean: tuple[float, ...] | None = None,
                   std: tuple[float, ...] | None = None) -> EncoderConfig:
    """The `EncoderConfig` of a canonical state dict: patch size, channels, width, grid, depth
    and MLP width from the shapes; heads from `num_heads`, else from the width (KNOWN_HEADS)."""
    state = tensors(state, where)
    extra = sorted(k for k in state if k.startswith(("cls_token", "reg_token", "norm_pre", "fc_norm", "attn_pool")))
    if extra:
        raise InteropError(f"{where}: {extra[0]} is not part of an I-JEPA encoder (a ViT without class token, "
                           f"average-pooled, norm before pooling); expected {EXPECTED}")
    for name in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight", "norm.weight"):
        if name not in state:
            raise InteropError(f"{where}: no tensor {name!r} (has {sorted(state)[:6]}...); expected {EXPECTED}")
    proj, pos = state["patch_embed.proj.weight"], state["pos_embed"]
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise InteropError(f"{where}: patch_embed.proj.weight has shape {tuple(proj.shape)}, expected "
                           f"[width, channels, patch, patch]")
    width, chans, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    n = pos.shape[-2] if pos.ndim == 3 else -1
    grid = math.isqrt(n) if n > 0 else 0
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != width or grid * grid != n:
        raise InteropError(f"{where}: pos_embed has shape {tuple(pos.shape)}, expected [1, grid*grid, {width}] "
                           f"(a square patch grid, no class-token position)")
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    mlp_ratio = hidden / width
    if int(width * mlp_ratio) != hidden:  # how timm's Block sizes its MLP
        raise InteropError(f"{where}: MLP width {hidden} is not int({width} * ratio) for any float ratio")
    heads = num_heads or KNOWN_HEADS.get(width)
    if heads is None:
        raise InteropError(f"{where}: the number of attention heads of a ViT of width {width} cannot be read "
                           f"from its weights and is not a known shape ({KNOWN_HEADS}); pass --num-heads")
    mean = tuple(mean) if mean else IMAGENET_MEAN if chans == 3 else IMAGENET_MEAN[:1]
    std = tuple(std) if std else IMAGENET_STD if chans == 3 else IMAGENET_STD[:1]
    try:
        cfg = EncoderConfig(img_size=grid * patch, patch_size=patch, in_chans=chans, embed_dim=width, depth=depth,
                            num_heads=heads, mlp_ratio=mlp_ratio, norm_mean=mean, norm_std=std,
                            pos_embed="stored", norm_eps=norm_eps)
        cfg.validate()
    except ConfigError as err:
        raise InteropError(f"{where}: {err}") from None
    return cfg


def build_encoder(cfg: EncoderConfig, state: Mapping[str, torch.Tensor], where: str) -> ViTEncoder:
    """A `ViTEncoder` of `cfg` holding exactly `state` (float32); every tensor must fit."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InteropError(f"{where}: non-finite values in {bad[:3]} (a corrupt file?)")
    model = ViTEncoder(cfg)
    try:
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    except RuntimeError as err:
        raise InteropError(f"{where}: the weights do not fit a ViT of their own shapes: {err}") from None
    if missing or unexpected:
        raise InteropError(f"{where}: not an I-JEPA ViT encoder: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}; expected {EXPECTED}")
    return model.eval().requires_grad_(False)


def canonical_state(encoder: ViTEncoder) -> dict[str, torch.Tensor]:
    """The encoder's weights under canonical names, positional table included (our own encoders
    compute it from the grid and do not save it; other libraries store it)."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()}
    state["pos_embed"] = encoder.pos_embed.detach().float().cpu().contiguous()
    return state


def check_blocks(state: Mapping[str, torch.Tensor], depth: int, where: str) -> None:
    """Every block 0..depth-1 has every part (names the first missing one)."""
    for i in range(depth):
        for part in _BLOCK_PARTS:
            if f"blocks.{i}.{part}.weight" not in state:
                raise InteropError(f"{where}: no tensor 'blocks.{i}.{part}.weight' (a truncated or partial "
                                   f"state dict?); expected {EXPECTED}")
