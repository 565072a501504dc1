"""Read what `shard_dataset` wrote: in-memory splits and WebDataset streams (the manifest and
its verification are in `ijepa.data.manifest`, re-exported here).

- ``load_split(shard_dir, split, labels=True)`` -> (uint8 [N, C, H, W], {label: LongTensor [N]}),
  in shard order (= the order the samples were written).
- ``make_pipeline(...)`` / ``make_loader(...)``: WebDataset streaming for training (below).

Determinism of the streams (exact resume): every random choice is seeded explicitly from
``(seed, epoch, rank, worker)`` -- never from the clock or the pid -- so for fixed
(seed, epoch, rank, world_size, num_workers) the sequence of samples/batches is the same on
every run. Build a new pipeline or loader for each epoch (it is cheap), passing `epoch`.

- Without ``resampled``: the shard list is shuffled (if `shardshuffle`) with a seed from
  (seed, epoch) -- identical on every rank -- then rank r takes shards ``r::world_size``
  and DataLoader worker w of k takes ``w::k`` of those (what ``wds.split_by_node`` /
  ``wds.split_by_worker`` do, but with rank/world given explicitly or read from
  torch.distributed). Ranks see different numbers of samples when shards do not divide
  evenly: fine for evaluation, not for DDP training.
- With ``resampled=True`` (use this under DDP): each (rank, worker) draws shards with
  replacement from its own seeded stream, endlessly, and the epoch is cut to exactly
  `epoch_samples` samples per rank (default ceil(N / world_size)), i.e.
  ``epoch_samples // batch_size`` batches when batching, via ``.with_epoch``. Every rank
  thus yields the same number of batches (no DDP hang: webdataset #188, #225, #444).
- ``shuffle_buffer`` > 0 adds a sample shuffle buffer per worker, seeded from
  (seed, epoch, rank, worker).
"""
from __future__ import annotations

import io
import math
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ijepa.data.manifest import (MANIFEST, ManifestMissingError, ShardError, UnknownSplitError, label_names,
                                 shard_entries, shard_root, split_info, load_manifest, split_size, split_urls,
                                 verify_shards)
from ijepa.data.location import is_remote, iter_tar_samples
from ijepa.data.photos import fit_square
from ijepa.seeding import stream_seed  # also importable from here, as before

__all__ = ["MANIFEST", "ShardError", "ManifestMissingError", "UnknownSplitError", "load_manifest", "verify_shards",
           "split_urls", "split_size", "label_names", "decode_sample", "make_pipeline", "make_loader",
           "load_split", "iter_split_samples", "stream_seed", "decode_image", "is_photo"]


# ----------------------------------------------------------------------------- decoding
def _decode_image(data: bytes, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode != ("L" if channels == 1 else "RGB"):
            im = im.convert("L" if channels == 1 else "RGB")
        arr = np.array(im, dtype=np.uint8)  # a writable copy: asarray views PIL's read-only buffer
    return arr[:, :, None] if arr.ndim == 2 else arr


decode_image = _decode_image  # bytes (PNG/JPEG) -> uint8 HxWxC


def _image_bytes(sample: dict[str, Any]) -> bytes:
    for ext in ("png", "jpg", "jpeg"):
        if ext in sample:
            return sample[ext]
    raise ShardError(f"sample {sample.get('__key__')!r} ({sample.get('__url__', '?')}) has no png/jpg member "
                     f"(has {sorted(k for k in sample if not k.startswith('_'))})")


def is_photo(manifest: dict[str, Any]) -> bool:
    """Whole photos of any size (imagefolder ``store: photo``), not image_size squares."""
    image = manifest.get("image")
    return isinstance(image, dict) and image.get("storage") == "photo"


def decode_sample(sample: dict[str, Any], channels: int, labels: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, int]]:
    """A raw webdataset sample (bytes per extension) -> (uint8 [C, H, W], {label: int})."""
    img = _decode_image(_image_bytes(sample), channels)
    out: dict[str, int] = {}
    for name in labels:
        if name not in sample:
            raise ShardError(f"sample {sample.get('__key__')!r} ({sample.get('__url__', '?')}) has no {name!r} label")
        out[name] = int(bytes(sample[name]).decode("ascii"))
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), out


class _Decode:
    """Picklable map stage: raw sample -> image | (image, labels) | (key, image, labels); photo
    shards give their `fit_square` view at `square` px."""

    def __init__(self, channels: int, labels: Sequence[str], with_labels: bool, with_keys: bool,
                 square: int | None = None):
        self.channels, self.labels = channels, list(labels)
        self.with_labels, self.with_keys, self.square = with_labels, with_keys, square

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[Any]:
        for sample in src:
            img, lab = decode_sample(sample, self.channels, self.labels if self.with_labels else ())
            if self.square is not None:
                sq = fit_square(img.permute(1, 2, 0).numpy(), self.square)
                img = torch.from_numpy(np.ascontiguousarray(sq.transpose(2, 0, 1)))
            if self.with_keys:
                yield sample["__key__"], img, lab
            elif self.with_labels:
                yield img, lab
            else:
                yield img


def _collate(samples: list[Any]) -> Any:
    first = samples[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(samples)
    if len(first) == 3:  # with keys
        keys = [s[0] for s in samples]
        imgs, labs = _collate([(s[1], s[2]) for s in samples])
        return keys, imgs, labs
    imgs = torch.stack([s[0] for s in samples])
    labs = {k: torch.tensor([s[1][k] for s in samples], dtype=torch.long) for k in first[1]}
    return imgs, labs


# ----------------------------------------------------------------------------- streaming
def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    r, w = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return (r if rank is None else rank), (w if world_size is None else world_size)


class _ShardList(torch.utils.data.IterableDataset):
    """Shard URLs for this (rank, worker): split (optionally shuffled) or resampled; all seeded."""

    def __init__(self, urls: list[str], seed: int, epoch: int, rank: int, world_size: int,
                 resampled: bool, shuffle: bool):
        super().__init__()
        self.urls, self.seed, self.epoch = list(urls), seed, epoch
        self.rank, self.world_size = rank, world_size
        self.resampled, self.shuffle = resampled, shuffle

    def __iter__(self) -> Iterator[dict[str, str]]:
        worker, num_workers = _worker()
        if self.resampled:
            rng = random.Random(stream_seed(self.seed, self.epoch, self.rank, worker, "shards"))
            while True:
                yield {"url": self.urls[rng.randrange(len(self.urls))]}
        urls = list(self.urls)
        if self.shuffle:
            random.Random(stream_seed(self.seed, self.epoch, "shards")).shuffle(urls)  # same on every rank
        for url in urls[self.rank::self.world_size][worker::num_workers]:
            yield {"url": url}


class _SeededShuffle:
    """Sample shuffle buffer whose RNG is seeded from (seed, epoch, rank, worker) at iteration time."""

    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int):
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        worker, _ = _worker()
        rng = random.Random(stream_seed(self.seed, self.epoch, self.rank, worker, "samples"))
        buf: list[Any] = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            k = rng.randrange(len(buf))
            out, buf[k] = buf[k], sample
            yield out
        while buf:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()


class _Expand:
    """Picklable stage: {"url"} -> the tar's samples, its sha256 checked as it streams (any URL)."""

    def __init__(self, entries: dict[str, dict[str, Any]]):
        self.entries = entries

    def __call__(self, src: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for item in src:
            yield from iter_tar_samples(item["url"], self.entries.get(item["url"]))


def make_pipeline(shard_dir: str | Path, split: str, *, labels: bool = True, batch_size: int | None = None,
                  shuffle_buffer: int = 0, shardshuffle: bool | None = None, seed: int = 0, epoch: int = 0,
                  rank: int | None = None, world_size: int | None = None, resampled: bool = False,
                  epoch_samples: int | None = None, partial: bool | None = None, with_keys: bool = False,
                  verify: bool = False, cut_epoch: bool = True):
    """A WebDataset pipeline (an IterableDataset) over one split for this rank.

    Yields uint8 [C, H, W] images, or (image, {label: int}) with `labels`, or
    (key, image, labels) with `with_keys`; with `batch_size`, batches of those
    (uint8 [B, C, H, W], {label: LongTensor [B]}).

    shardshuffle: shuffle the shard order per epoch (default: True when shuffle_buffer > 0).
    rank / world_size: this process's rank (default: torch.distributed if initialised, else 0/1).
    resampled / epoch_samples: see the module docstring; under DDP pass resampled=True.
    partial: keep a last incomplete batch (default: True unless resampled).
    The order depends only on (seed, epoch, rank, world_size, DataLoader num_workers).
    When the pipeline runs inside a DataLoader with k workers and resampled=True, every
    worker yields `epoch_samples` samples: use `make_loader`, which cuts the epoch at the
    loader instead (cut_epoch=False leaves the resampled stream endless).
    """
    import webdataset as wds

    root = shard_root(shard_dir)
    manifest = verify_shards(root, [split]) if verify and not is_remote(root) else load_manifest(root)
    info = split_info(manifest, split, root)
    entries = {str(root / s["name"]): s for s in shard_entries(info, root)}
    urls = list(entries)
    if not urls:
        raise ShardError(f"{root}: split {split!r} has no shards (0 samples)")
    rank, world_size = _dist_rank_world(rank, world_size)
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if shardshuffle is None:
        shardshuffle = shuffle_buffer > 0
    if partial is None:
        partial = not resampled
    stages: list[Any] = [
        _ShardList(urls, seed, epoch, rank, world_size, resampled, shardshuffle),
        _Expand(entries),
    ]
    if shuffle_buffer > 0:
        stages.append(_SeededShuffle(shuffle_buffer, seed, epoch, rank))
    stages.append(_Decode(int(manifest["channels"]), label_names(manifest), labels, with_keys,
                          int(manifest["image_size"]) if is_photo(manifest) else None))
    if batch_size is not None:
        stages.append(wds.batched(batch_size, collation_fn=_collate, partial=partial))
    pipe = wds.DataPipeline(*stages)
    if cut_epoch and (resampled or epoch_samples is not None):
        n = epoch_samples if epoch_samples is not None else math.ceil(int(info["samples"]) / world_size)
        pipe = pipe.with_epoch(n // batch_size if batch_size is not None else n)
    return pipe


def make_loader(shard_dir: str | Path, split: str, *, batch_size: int, num_workers: int = 0,
                labels: bool = True, shuffle_buffer: int = 0, shardshuffle: bool | None = None, seed: int = 0,
                epoch: int = 0, rank: int | None = None, world_size: int | None = None, resampled: bool = False,
                epoch_samples: int | None = None, partial: bool | None = None, with_keys: bool = False,
                pin_memory: bool = False, verify: bool = False):
    """`make_pipeline` batched inside the workers, wrapped in a wds.WebLoader.

    With `resampled`, the loader yields exactly ``epoch_samples // batch_size`` batches on
    every rank (epoch_samples default ceil(N / world_size)); the order is fixed by
    (seed, epoch, rank, world_size, num_workers).
    """
    import webdataset as wds

    rank, world_size = _dist_rank_world(rank, world_size)
    pipe = make_pipeline(shard_dir, split, labels=labels, batch_size=batch_size, shuffle_buffer=shuffle_buffer,
                         shardshuffle=shardshuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                         resampled=resampled, epoch_samples=None if resampled else epoch_samples,
                         partial=partial, with_keys=with_keys, verify=verify, cut_epoch=not resampled)
    loader = wds.WebLoader(pipe, batch_size=None, shuffle=False, num_workers=num_workers,
                           pin_memory=pin_memory, persistent_workers=False)
    if resampled:
        n = epoch_samples if epoch_samples is not None else math.ceil(split_size(shard_dir, split) / world_size)
        loader = loader.with_epoch(n // batch_size)
    return loader


# ----------------------------------------------------------------------------- in memory
def iter_split_samples(shard_dir: str | Path, split: str) -> Iterator[dict[str, Any]]:
    """Raw samples ({"__key__", ext: bytes}) of a split in manifest order, straight from the tars
    (local or remote); each shard's sha256 is checked as it streams (ShardError naming it)."""
    root = shard_root(shard_dir)
    for entry in shard_entries(split_info(load_manifest(root), split, root), root):
        yield from iter_tar_samples(root / entry["name"], entry)


def load_split(shard_dir: str | Path, split: str, labels: bool = True,
               verify: bool = False, rows: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole split in memory, in shard order: (uint8 [N, C, H, W], {label: LongTensor [N]}).

    `rows` (increasing positions in shard order): only those samples are decoded and returned
    (a fixed subset costs its own decoding, not the split's).

    Photo shards (``image.storage: photo``) are brought to image_size x image_size by
    `ijepa.data.photos.fit_square` (shorter side resized, centre square).

    The label dict is empty with labels=False or when the dataset has no labels."""
    root = shard_root(shard_dir)
    manifest = verify_shards(root, [split]) if verify and not is_remote(root) else load_manifest(root)
    info = split_info(manifest, split, root)
    n, c, size = int(info["samples"]), int(manifest["channels"]), int(manifest["image_size"])
    photo = is_photo(manifest)
    names = label_names(manifest) if labels else []
    if rows is not None:
        rows = [int(r) for r in rows]
        if any(b <= a for a, b in zip(rows, rows[1:])) or (rows and not 0 <= rows[0] <= rows[-1] < n):
            raise ValueError(f"load_split: rows must be increasing positions in [0, {n}), got {rows[:5]}...")
    slot = {r: j for j, r in enumerate(rows)} if rows is not None else None
    m = len(rows) if rows is not None else n
    images = np.empty((m, size, size, c), np.uint8)
    labs = {k: np.empty(m, np.int64) for k in names}
    i = 0
    for sample in iter_split_samples(root, split):
        if i >= n:
            raise ShardError(f"{root}: split {split!r} has more samples than the manifest's {n}")
        j = i if slot is None else slot.get(i)
        if j is None:  # not a selected row: counted, not decoded
            i += 1
            continue
        img = _decode_image(_image_bytes(sample), c)
        if photo:  # whole photos: the probes' deterministic view
            img = fit_square(img, size)
        if img.shape != (size, size, c):
            raise ShardError(f"sample {sample['__key__']!r} in {sample['__url__']} is {img.shape}, the manifest "
                             f"says {(size, size, c)}")
        images[j] = img
        for k in names:
            if k not in sample:
                raise ShardError(f"sample {sample['__key__']!r} in {sample['__url__']} has no {k!r} label")
            labs[k][j] = int(sample[k].decode("ascii"))
        i += 1
    if i != n:
        raise ShardError(f"{root}: split {split!r} has {i} samples, the manifest says {n}")
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return tensor, {k: torch.from_numpy(v) for k, v in labs.items()}
