"""Training batches for pretraining: deterministic order, exact resume, equal batches per rank.

Readers (`ijepa.train_input` drives them from DataLoader workers, one step per item), built on
the data library (`ijepa.data`):

- `MemoryBatches` (default for small datasets: ``data.mode: auto`` picks it when the decoded
  train split fits in ``data.memory_limit_mb``): the split is decoded once into a uint8
  tensor (`ijepa.data.load_split`). Epoch `e` uses the permutation drawn from
  ``(seed, e)``; global batch `k` is ``perm[k*G:(k+1)*G]`` (G = batch_size over all ranks;
  the tail that does not fill a batch is dropped) and rank `r` takes rows
  ``[r*b, (r+1)*b)`` of it. Every rank has the same number of batches, N ranks with batch b
  see exactly the images of 1 rank with batch N*b, and resume jumps to batch `k` directly.
- `EncodedBatches`: the same for photo shards (whole photos of any size), kept in memory as
  their encoded bytes and decoded per batch.
- `StreamBatches` (large datasets; ``data.mode: stream``, or auto above the limit): shards
  streamed from any location (ijepa.data.location, sha256 checked as they stream), resampled
  with replacement per (rank, sample stream), a seeded sample shuffle buffer, exactly
  `steps_per_epoch` batches on every rank. The order is fixed for fixed (seed, epoch, rank,
  world, num_workers); resume skips the samples already trained on without decoding them.

Augmentation: RandomResizedCrop to `image_size` (scale (0.3, 1.0), ratio (3/4, 4/3)), the
paper's only augmentation, drawn per image from a generator seeded by ``(seed, step)`` for
the whole global batch (each rank uses its rows). Decoded squares (`Augmenter`): batched with
``affine_grid`` + bilinear ``grid_sample``, leaving as float in [0, 1]. Photos
(`photo_crops`): the same draws give each photo's box in its own size, cut and resized with
PIL (bilinear, antialiased; JPEGs decoded at a reduced DCT scale when the crop allows),
leaving as uint8. The encoder normalises inside.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ijepa.config import ConfigError
from ijepa.masks import derive_seed, make_generator

__all__ = ["ShardInfo", "read_shard_info", "load_train_images", "MemoryBatches", "EncodedBatches", "StreamBatches",
           "Augmenter", "crop_params", "boxes_from", "resized_crops", "photo_crops", "to_float", "AUG_STREAM",
           "DATA_STREAM"]

log = logging.getLogger(__name__)

# Distinct streams for derive_seed, so data order, crops and masks never share draws.
DATA_STREAM = 101
AUG_STREAM = 202


# ----------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class ShardInfo:
    """What pretraining needs from a shard folder's manifest.json."""

    root: Any  # a local Path or a remote ijepa.data.location.UrlRoot
    dataset: str
    image_size: int
    channels: int
    train_samples: int
    train_shards: tuple[str, ...]
    manifest_sha256: str
    photo: bool = False  # whole photos of any size (imagefolder store: photo), cropped when read
    train_file_bytes: int = 0  # bytes of the split's shards
    train_entries: tuple[dict, ...] = ()  # the manifest's shard records (name, bytes, sha256)

    @property
    def train_bytes(self) -> int:
        """Bytes the split takes in memory: decoded squares, or the encoded photos."""
        if self.photo:
            return self.train_file_bytes
        return self.train_samples * self.channels * self.image_size * self.image_size

    @property
    def manifest_url(self) -> Any:
        return self.root / "manifest.json"


def read_shard_info(shard_dir: str | Path, split: str = "train", verify: bool = False) -> ShardInfo:
    """Image size, channels and the `split`'s sample count and shard files (ijepa.data.reader).

    `verify` also checks every shard of the split against the sha256 in the manifest."""
    import hashlib

    from ijepa.data import manifest as mf, reader

    root = mf.shard_root(shard_dir)
    # remote shards: read once, hashed as they stream (ijepa.data.location), not downloaded twice
    manifest = reader.verify_shards(root, [split]) if verify and not mf.is_remote(root) else reader.load_manifest(root)
    where = root / reader.MANIFEST
    if split not in manifest["splits"]:
        raise ConfigError(f"{where}: no {split!r} split to pretrain on (has {sorted(manifest['splits'])})")
    try:
        size, chans = int(manifest["image_size"]), int(manifest["channels"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: the manifest records no image_size / channels") from None
    entries = tuple(mf.shard_entries(manifest["splits"][split], where))
    return ShardInfo(root=root, dataset=str(manifest.get("dataset") or root.name), image_size=size, channels=chans,
                     train_samples=int(manifest["splits"][split]["samples"]),
                     train_shards=tuple(str(root / e["name"]) for e in entries),
                     manifest_sha256=hashlib.sha256(mf.manifest_bytes(root)).hexdigest(),
                     photo=reader.is_photo(manifest), train_file_bytes=sum(int(e.get("bytes", 0)) for e in entries),
                     train_entries=entries)


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

    def batch(self, epoch: int, k: int) -> torch.Tensor:
        return self.images.index_select(0, self.indices(epoch, k))

    def batches(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        for k in range(start, self.steps_per_epoch):
            yield self.batch(epoch, k)


class EncodedBatches(MemoryBatches):
    """Photo shards in memory as their encoded bytes (decoded per batch, in the loader's workers);
    the same permutation and rank split as `MemoryBatches`."""

    def __init__(self, info: ShardInfo, batch_size: int, rank: int, world_size: int, seed: int):
        from ijepa.data import reader

        self.data = [reader._image_bytes(s) for s in reader.iter_split_samples(info.root, "train")]
        if len(self.data) != info.train_samples:
            raise ConfigError(f"{info.root}: the train split has {len(self.data)} samples, the manifest says "
                              f"{info.train_samples}")
        self.global_batch, self.local_batch = batch_size, batch_size // world_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps_per_epoch = len(self.data) // batch_size
        self._perm_epoch, self._perm = None, None
        self.n = len(self.data)

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            self._perm = torch.randperm(self.n, generator=make_generator(DATA_STREAM, self.seed, epoch))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, epoch: int, k: int) -> list[bytes]:
        return [self.data[i] for i in self.indices(epoch, k).tolist()]

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[bytes]]:
        for k in range(start, self.steps_per_epoch):
            yield self.batch(epoch, k)


class StreamBatches:
    """Shards streamed (any location; sha256 checked as they stream), resampled with replacement,
    so every rank has exactly `steps_per_epoch` batches (DDP ranks never wait on each other).

    The epoch's batches are dealt to `streams` = max(1, num_workers) sample streams: batch k
    comes from stream k % streams, seeded by (seed, epoch, rank, stream), which is what a
    DataLoader worker reads (worker w gets the steps w, w + K, ...). The order is thus fixed by
    (seed, epoch, rank, world_size, num_workers); 0 and 1 workers give the same batches. Resume
    at batch k skips the samples of the earlier batches of each stream without decoding them."""

    def __init__(self, info: ShardInfo, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 0, shuffle_buffer: int = 1000):
        if not info.train_shards:
            raise ConfigError(f"{info.root}: the train split has no shards")
        self.info = info
        self.global_batch = batch_size
        self.local_batch = batch_size // world_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.streams = max(1, num_workers)
        self.steps_per_epoch = info.train_samples // batch_size
        self.records = {u: e for u, e in zip(info.train_shards, info.train_entries)}

    def raw_batches(self, epoch: int, stream: int, start: int) -> Iterator[list[dict[str, Any]]]:
        """Lists of `local_batch` raw samples for the epoch's batches k = start, start + streams, ...
        (start % streams == stream), endlessly."""
        import random

        from ijepa.data.location import iter_tar_samples
        from ijepa.seeding import stream_seed

        seed = derive_seed(DATA_STREAM, self.seed)
        urls = list(self.info.train_shards)
        pick = random.Random(stream_seed(seed, epoch, self.rank, stream, "shards"))
        rng = random.Random(stream_seed(seed, epoch, self.rank, stream, "samples"))

        def samples() -> Iterator[dict[str, Any]]:
            buf: list[dict[str, Any]] = []
            while True:
                url = urls[pick.randrange(len(urls))]
                for sample in iter_tar_samples(url, self.records.get(url)):
                    if len(buf) < self.shuffle_buffer:
                        buf.append(sample)
                        continue
                    k = rng.randrange(len(buf))
                    buf[k], sample = sample, buf[k]
                    yield sample

        it = samples()
        skip = (start - stream) // self.streams * self.local_batch  # earlier batches of this stream
        for _ in itertools.islice(it, skip):
            pass
        while True:
            yield list(itertools.islice(it, self.local_batch))

    def batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """This rank's batches of the epoch from `start` in one process: decoded uint8 [b, C, H, W]
        (photo shards: lists of encoded bytes)."""
        from ijepa.data import reader

        gens: dict[int, Iterator[list[dict[str, Any]]]] = {}
        for k in range(start, self.steps_per_epoch):
            v = k % self.streams
            if v not in gens:
                gens[v] = self.raw_batches(epoch, v, k)
            raw = next(gens[v])
            if self.info.photo:
                yield [reader._image_bytes(s) for s in raw]
            else:
                yield torch.stack([reader.decode_sample(s, self.info.channels)[0] for s in raw])


# ------------------------------------------------------------------------------ augmentation
def crop_params(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                generator: torch.Generator, attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes, torchvision's algorithm vectorised: [n, 4] (top, left, h, w).

    Per image, up to `attempts` (area, log-ratio) draws; the first that fits is used; if
    none fits, the central crop with the ratio clamped to `ratio`.
    """
    u = torch.rand(n, attempts, 4, generator=generator, dtype=torch.float64)
    return boxes_from(u, height, width, scale, ratio)


def boxes_from(u: torch.Tensor, height: int, width: int, scale: tuple[float, float],
               ratio: tuple[float, float]) -> torch.Tensor:
    """`crop_params` from its uniform draws u [n, attempts, 4] (one image size for the n)."""
    n = u.shape[0]
    area = height * width
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


def photo_crops(data: list[bytes], u: torch.Tensor | None, size: int, channels: int, scale: tuple[float, float],
                ratio: tuple[float, float]) -> torch.Tensor:
    """Encoded photos -> uint8 [n, C, size, size]: RandomResizedCrop from the draws u [n, attempts, 4]
    (the boxes `boxes_from` gives for each photo's own size), or with u None the probes' view
    (`fit_square`). A JPEG is decoded at the smallest DCT scale that keeps the crop >= size px."""
    import io

    import numpy as np
    from PIL import Image

    from ijepa.data.photos import fit_square, open_rgb

    out = np.empty((len(data), size, size, channels), np.uint8)
    for i, b in enumerate(data):
        with Image.open(io.BytesIO(b)) as im:
            W, H = im.size
            if u is None:
                arr = np.asarray(open_rgb(im) if channels == 3 else im.convert("L"), dtype=np.uint8)
                out[i] = fit_square(arr[:, :, None] if arr.ndim == 2 else arr, size)
                continue
            top, left, h, w = boxes_from(u[i:i + 1], H, W, scale, ratio)[0].tolist()
            if im.format == "JPEG":
                im.draft(im.mode, (math.ceil(W * size / w), math.ceil(H * size / h)))
            sx, sy = im.size[0] / W, im.size[1] / H
            im = open_rgb(im) if channels == 3 else im.convert("L")
            crop = im.resize((size, size), Image.Resampling.BILINEAR,
                             box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
            arr = np.asarray(crop, dtype=np.uint8)
            out[i] = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
