"""Frozen-encoder features for the probes, computed once per (encoder, n_last, split) and cached.

Cache layout (one safetensors file per split, written atomically)::

    <cache_dir>/<encoder_key>/n_last<k>/<split>.safetensors
        tensor "features": float32 [N, D]
        tensor "tokens":   bfloat16 [N, T, D_last]   (only when asked for: the attentive probes)
        metadata: encoder_key, n_last, split, data_fingerprint, precision, n, dim, tokens

`encoder_key` is the sha256 of the exported weights file (`export.file_sha256`) for a
trained encoder, and `random_init-<sha256 of the state dict>` for the randomly initialised
baseline. A cached file is reused only when its metadata matches the request, including
the fingerprint of the shards (sha256 of their manifest.json), so re-generated shards or a
changed encoder are recomputed; an unreadable cache file is recomputed too.

Tokens (`keep_tokens=True`): the last layer's patch tokens after the encoder's final
LayerNorm, kept from the same forward pass that computes the pooled features (a forward hook
on that LayerNorm keeps its last output; the encoder runs once), stored in bf16 to halve
memory and disk. A request with tokens reuses a cached file only when it holds them; a request
without tokens reuses any matching file.

`AdaptedEncoder` puts an encoder behind an input adaptation (resize to its image size,
replicate grey to its channels), batch by batch, for an encoder made for other images (an
imported ViT at 224 px probed on 28-px grey Fashion-MNIST); the probes use it only when the
shapes differ, and fold the adaptation into the cache's data fingerprint.

Raw-pixel features (`pixel_features`) are cheap and not cached: images scaled to [0, 1],
flattened; when C*H*W exceeds `max_dim` the image is average-pooled by the smallest
integer factor f that brings C*ceil(H/f)*ceil(W/f) to at most `max_dim` (adaptive pooling
to that size) before flattening. Standardisation happens in the probe (ijepa.linear).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ijepa.atomic import atomic_path
from ijepa.precision import adapt_for_precision, autocast_for, resolve_precision

__all__ = ["cache_path", "cached_features", "extract_features", "encoder_features", "pixel_features",
           "state_sha256", "AdaptedEncoder", "TOKEN_DTYPE"]

log = logging.getLogger(__name__)

TOKEN_DTYPE = torch.bfloat16  # cached patch tokens: half the memory of fp32, ample for a probe's input


def cache_path(cache_dir: str | os.PathLike, encoder_key: str, n_last: int, split: str) -> Path:
    return Path(cache_dir) / encoder_key / f"n_last{n_last}" / f"{split}.safetensors"


def state_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes), in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _final_norm(encoder: torch.nn.Module) -> torch.nn.Module:
    """The LayerNorm whose last output in `features` is the last layer's tokens (ViTEncoder.norm)."""
    inner = getattr(encoder, "encoder", encoder)  # AdaptedEncoder wraps the encoder
    norm = getattr(inner, "norm", None)
    if not isinstance(norm, torch.nn.LayerNorm):
        raise TypeError(f"cannot keep tokens of {type(inner).__name__}: it has no final LayerNorm `norm`")
    return norm


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, images: torch.Tensor, n_last: int = 1, batch_size: int = 256,
                     device: str | torch.device = "cpu", progress: bool = True, desc: str = "features",
                     precision: str = "fp32", keep_tokens: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, C, H, W] -> float32 features [N, D] via `encoder.features` (eval mode);
    with `keep_tokens`, also the last layer's tokens [N, T, D_last] (TOKEN_DTYPE) of the same pass.

    `precision` "bf16" (or "auto" where it resolves so, `ijepa.precision`) runs the encoder
    under bf16 autocast: several times faster on CPUs with native bf16."""
    encoder.eval()
    adapt_for_precision(encoder, precision, device)
    n = images.shape[0]
    out: list[torch.Tensor] = []
    toks: list[torch.Tensor] = []
    last: list[torch.Tensor] = []

    def keep_last(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        last[:] = [output]  # the final norm's last call in `features` is the last layer's

    hook = _final_norm(encoder).register_forward_hook(keep_last) if keep_tokens else None
    try:
        with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for i in range(0, n, batch_size):
                x = images[i:i + batch_size].to(device=device, dtype=torch.float32) / 255.0
                with autocast_for(precision, device):
                    out.append(encoder.features(x, n_last=n_last).float().cpu())
                if keep_tokens:
                    toks.append(last[0].to(device="cpu", dtype=TOKEN_DTYPE))
                bar.update(x.shape[0])
    finally:
        if hook is not None:
            hook.remove()
    if not out:
        raise ValueError("extract_features got no images")
    return (torch.cat(out), torch.cat(toks)) if keep_tokens else torch.cat(out)


class AdaptedEncoder(torch.nn.Module):
    """`encoder.features` on images resized to `size` x `size` (bicubic, antialiased, clamped
    to [0, 1]) and with a grey channel replicated to `channels`; None leaves that as it is."""

    RESIZE = "bicubic, antialias, clamped to [0, 1]"

    def __init__(self, encoder: torch.nn.Module, size: int | None = None, channels: int | None = None):
        super().__init__()
        self.encoder, self.size, self.channels = encoder, size, channels

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False,
                              antialias=True).clamp_(0.0, 1.0)
        if self.channels is not None and x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        return x

    def features(self, images: torch.Tensor, n_last: int = 1) -> torch.Tensor:
        return self.encoder.features(self.adapt(images), n_last=n_last)


def _read_cache(path: Path, expect: dict[str, str], tokens: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if any(meta.get(k) != v for k, v in expect.items()):
                log.info("feature cache %s is stale (%s != %s); recomputing", path, meta, expect)
                return None
            if tokens and "tokens" not in fh.keys():
                log.info("feature cache %s holds no tokens; recomputing with them", path)
                return None
            feats = fh.get_tensor("features")
            toks = fh.get_tensor("tokens") if tokens else None
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        log.warning("feature cache %s is unreadable (%s); recomputing", path, err)
        return None
    if feats.ndim != 2 or str(feats.shape[0]) != meta.get("n") or (
            toks is not None and (toks.ndim != 3 or toks.shape[0] != feats.shape[0])):
        log.warning("feature cache %s has shape %s (tokens %s), metadata says n=%s; recomputing", path,
                    tuple(feats.shape), None if toks is None else tuple(toks.shape), meta.get("n"))
        return None
    return feats, toks


def cached_features(cache_dir: str | os.PathLike, encoder_key: str, n_last: int, split: str,
                    data_fingerprint: str, compute: Callable[[], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
                    precision: str = "fp32", tokens: bool = False
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Features from the cache when encoder key, n_last, split, data fingerprint and the
    (resolved) precision match; otherwise `compute()` them and write the cache atomically.
    With `tokens`, `compute()` returns (features, tokens), the cache must hold tokens too, and
    (features, tokens) is returned."""
    path = cache_path(cache_dir, encoder_key, n_last, split)
    expect = {"encoder_key": encoder_key, "n_last": str(n_last), "split": split,
              "data_fingerprint": data_fingerprint, "precision": precision}
    hit = _read_cache(path, expect, tokens)
    if hit is not None:
        return hit if tokens else hit[0]
    computed = compute()
    feats, toks = computed if tokens else (computed, None)
    feats = feats.float().contiguous()
    tensors = {"features": feats}
    meta = dict(expect, n=str(feats.shape[0]), dim=str(feats.shape[1]))
    if toks is not None:
        toks = toks.to(TOKEN_DTYPE).contiguous()
        tensors["tokens"] = toks
        meta["tokens"] = "x".join(str(v) for v in toks.shape[1:])
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return (feats, toks) if tokens else feats


def encoder_features(encoder: torch.nn.Module, encoder_key: str, images: torch.Tensor, split: str, *,
                     n_last: int, cache_dir: str | os.PathLike, data_fingerprint: str, batch_size: int = 256,
                     device: str | torch.device = "cpu", progress: bool = True, name: str = "",
                     precision: str = "fp32", tokens: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`extract_features` through the on-disk cache; with `tokens`, (features, tokens)."""
    precision = resolve_precision(precision, device)

    def compute() -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return extract_features(encoder.to(device), images, n_last=n_last, batch_size=batch_size, device=device,
                                progress=progress, desc=f"{name or encoder_key[:12]} {split}", precision=precision,
                                keep_tokens=tokens)

    return cached_features(cache_dir, encoder_key, n_last, split, data_fingerprint, compute, precision, tokens)


def pixel_pool_factor(shape: tuple[int, int, int], max_dim: int) -> int:
    """Smallest integer f >= 1 with C * ceil(H/f) * ceil(W/f) <= max_dim (at least 1x1 per channel)."""
    c, h, w = shape
    f = 1
    while c * math.ceil(h / f) * math.ceil(w / f) > max_dim and (math.ceil(h / f) > 1 or math.ceil(w / f) > 1):
        f += 1
    return f


def pixel_features(images: torch.Tensor, max_dim: int = 4096, batch_size: int = 4096) -> torch.Tensor:
    """uint8 images [N, C, H, W] -> float32 [N, <= max_dim] raw pixels in [0, 1] (module docstring)."""
    n, c, h, w = images.shape
    f = pixel_pool_factor((c, h, w), max_dim)
    size = (math.ceil(h / f), math.ceil(w / f))
    out = []
    for i in range(0, n, batch_size):
        x = images[i:i + batch_size].float() / 255.0
        if f > 1:
            x = F.adaptive_avg_pool2d(x, size)
        out.append(x.reshape(x.shape[0], -1))
    return torch.cat(out) if out else torch.zeros(0, c * size[0] * size[1])
