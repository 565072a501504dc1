"""Training batches for pretraining: deterministic order, exact resume, equal batches per rank.

Two readers with the same interface (`batches(epoch, start)` -> iterator of uint8
[b, C, H, W] for THIS rank, exactly `steps_per_epoch - start` of them), both built on the
data library (`ijepa.data`):

- `MemoryBatches` (default for small datasets: ``data.mode: auto`` picks it when the decoded
  train split fits in ``data.memory_limit_mb``): the split is decoded once into a uint8
  tensor (`ijepa.data.load_split`). Epoch `e` uses the permutation drawn from
  ``(seed, e)``; global batch `k` is ``perm[k*G:(k+1)*G]`` (G = batch_size over all ranks;
  the tail that does not fill a batch is dropped) and rank `r` takes rows
  ``[r*b, (r+1)*b)`` of it. Every rank has the same number of batches, N ranks with batch b
  see exactly the images of 1 rank with batch N*b, and resume jumps to batch `k` directly.
- `StreamBatches` (large datasets; ``data.mode: stream``, or auto above the limit):
  WebDataset streaming through `ijepa.data.make_loader`: shards
  resampled per (rank, worker), a seeded sample shuffle buffer, and the epoch cut by
  ``with_epoch`` to exactly `steps_per_epoch` batches on every rank. The order is fixed for
  fixed (seed, epoch, rank, world, num_workers); resume re-opens the epoch and skips the
  batches already trained on (exact, but it decodes them again).

Augmentation (`Augmenter`): RandomResizedCrop to the same size (scale (0.3, 1.0), ratio
(3/4, 4/3)), the paper's only augmentation, drawn per image from a generator seeded by
``(seed, step)`` for the whole global batch (each rank uses its rows), applied batched
with ``affine_grid`` + bilinear ``grid_sample``. Images leave as float in [0, 1]; the encoder
normalises inside.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from ijepa.config import ConfigError
from ijepa.masks import derive_seed, make_generator

__all__ = ["ShardInfo", "read_shard_info", "load_train_images", "MemoryBatches", "StreamBatches", "Augmenter",
           "crop_params", "resized_crops", "to_float", "AUG_STREAM", "DATA_STREAM"]

log = logging.getLogger(__name__)

# Distinct streams for derive_seed, so data order, crops and masks never share draws.
DATA_STREAM = 101
AUG_STREAM = 202


# ----------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class ShardInfo:
    """What pretraining needs from a shard folder's manifest.json."""

    root: Path
    dataset: str
    image_size: int
    channels: int
    train_samples: int
    train_shards: tuple[str, ...]
    manifest_sha256: str

    @property
    def train_bytes(self) -> int:
        return self.train_samples * self.channels * self.image_size * self.image_size


def read_shard_info(shard_dir: str | Path, split: str = "train", verify: bool = False) -> ShardInfo:
    """Image size, channels and the `split`'s sample count and shard files (ijepa.data.reader).

    `verify` also checks every shard of the split against the sha256 in the manifest."""
    from ijepa.data import reader
    from ijepa.export import file_sha256

    root = Path(shard_dir)
    manifest = reader.verify_shards(root, [split]) if verify else reader.load_manifest(root)
    where = root / reader.MANIFEST
    if split not in manifest["splits"]:
        raise ConfigError(f"{where}: no {split!r} split to pretrain on (has {sorted(manifest['splits'])})")
    try:
        size, chans = int(manifest["image_size"]), int(manifest["channels"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: the manifest records no image_size / channels") from None
    return ShardInfo(root=root, dataset=str(manifest.get("dataset") or root.name), image_size=size, channels=chans,
                     train_samples=int(manifest["splits"][split]["samples"]),
                     train_shards=tuple(reader.split_urls(root, split)), manifest_sha256=file_sha256(where))


def load_train_images(info: ShardInfo, split: str = "train") -> torch.Tensor:
    """The whole split in memory as uint8 [N, C, H, W] (ijepa.data.load_split, shard order)."""
    from ijepa.data import reader

    images, _ = reader.load_split(info.root, split, labels=False)
    return images


# ----------------------------------------------------------------------------------- readers
class MemoryBatches:
    """In-memory train split with a per-epoch global permutation split evenly across ranks."""

    def __init__(self, images: torch.Tensor, batch_size: int, rank: int, world_size: int, seed: int):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 [N, C, H, W] images, got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.global_batch = batch_size
        self.local_batch = batch_size // world_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps_per_epoch = images.shape[0] // batch_size
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = make_generator(DATA_STREAM, self.seed, epoch)
            self._perm = torch.randperm(self.images.shape[0], generator=g)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, epoch: int, k: int) -> torch.Tensor:
        lo = k * self.global_batch + self.rank * self.local_batch
        return self.permutation(epoch)[lo:lo + self.local_batch]

    def batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        for k in range(start, self.steps_per_epoch):
            yield self.images.index_select(0, self.indices(epoch, k))


class StreamBatches:
    """WebDataset streaming through `ijepa.data.make_loader` with resampled shards and
    ``with_epoch`` (so that DDP ranks never wait on each other): exactly `steps_per_epoch` batches per rank and epoch; the
    order is fixed by (seed, epoch, rank, world_size, num_workers)."""

    def __init__(self, info: ShardInfo, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 0, shuffle_buffer: int = 1000):
        if not info.train_shards:
            raise ConfigError(f"{info.root}: the train split has no shards")
        self.info = info
        self.global_batch = batch_size
        self.local_batch = batch_size // world_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.steps_per_epoch = info.train_samples // batch_size

    def loader(self, epoch: int):
        from ijepa.data import make_loader

        return make_loader(self.info.root, "train", batch_size=self.local_batch, num_workers=self.num_workers,
                           labels=False, shuffle_buffer=self.shuffle_buffer, seed=derive_seed(DATA_STREAM, self.seed),
                           epoch=epoch, rank=self.rank, world_size=self.world_size, resampled=True,
                           epoch_samples=self.steps_per_epoch * self.local_batch)

    def batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        return itertools.islice(iter(self.loader(epoch)), start, None)


# ------------------------------------------------------------------------------ augmentation
def crop_params(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                generator: torch.Generator, attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes, torchvision's algorithm vectorised: [n, 4] (top, left, h, w).

    Per image, up to `attempts` (area, log-ratio) draws; the first that fits is used; if
    none fits, the central crop with the ratio clamped to `ratio`.
    """
    area = height * width
    u = torch.rand(n, attempts, 4, generator=generator, dtype=torch.float64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    ar = torch.exp(log_r)
    w = torch.sqrt(target_area * ar).round()
    h = torch.sqrt(target_area / ar).round()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0)
    rows = torch.arange(n)
    hh, ww = h[rows, pick], w[rows, pick]
    top = torch.floor(u[rows, pick, 2] * (height - hh + 1))
    left = torch.floor(u[rows, pick, 3] * (width - ww + 1))
    # fallback: central crop
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = height, round(height * ratio[1])
    else:
        fw, fh = width, height
    bad = first < 0
    hh = torch.where(bad, torch.full_like(hh, fh), hh)
    ww = torch.where(bad, torch.full_like(ww, fw), ww)
    top = torch.where(bad, torch.full_like(top, (height - fh) // 2), top)
    left = torch.where(bad, torch.full_like(left, (width - fw) // 2), left)
    return torch.stack([top, left, hh, ww], dim=1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Crop each float image [B, C, H, W] to its box (top, left, h, w) and resize it back to
    (H, W), bilinear (align_corners=False, like F.interpolate on the crop)."""
    B, _, H, W = images.shape
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    top, left, h, w = boxes.unbind(1)
    theta = torch.zeros(B, 2, 3, device=images.device, dtype=torch.float32)
    theta[:, 0, 0] = w / W
    theta[:, 0, 2] = (2 * left + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * top + h) / H - 1
    grid = F.affine_grid(theta, [B, 1, H, W], align_corners=False).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


class Augmenter:
    """Seeded RandomResizedCrop (same output size) for one rank's slice of a global batch."""

    def __init__(self, enabled: bool, scale: tuple[float, float], ratio: tuple[float, float], seed: int,
                 global_batch: int, rank: int, world_size: int):
        self.enabled, self.scale, self.ratio, self.seed = enabled, tuple(scale), tuple(ratio), seed
        self.global_batch, self.rank, self.local = global_batch, rank, global_batch // world_size

    def __call__(self, images_uint8: torch.Tensor, step: int, device: torch.device | None = None) -> torch.Tensor:
        x = images_uint8.to(device, non_blocking=True) if device is not None else images_uint8
        x = to_float(x)
        if not self.enabled:
            return x
        _, _, H, W = x.shape
        g = make_generator(AUG_STREAM, self.seed, step)
        boxes = crop_params(self.global_batch, H, W, self.scale, self.ratio, g)
        boxes = boxes[self.rank * self.local:(self.rank + 1) * self.local]
        return resized_crops(x, boxes)
