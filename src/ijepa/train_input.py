"""What the trainer receives each step: (images, masks), built in DataLoader workers.

`TrainInput` picks the reader (ijepa.train_data) and hands the loop one iterator from the
first step to the last. Each item is the whole input of one step for this rank: the images
(decoded, RandomResizedCrop seeded by (seed, step)) and the step's masks (the global batch's
masks from ``make_generator(seed, step)``, this rank's rows). Both are built in the
DataLoader's workers, so decoding, cropping and the NEXT steps' masks run while the current
step trains (`prefetch` items per worker); with a CUDA device the batches come in pinned
memory and are copied with ``non_blocking=True``.

Determinism: every draw depends on (seed, step, rank) only, never on the worker that made it.
In-memory modes are a map-style dataset indexed by the step (any worker count gives the same
batches, in order). Streaming deals batch k of an epoch to sample stream k % K (K = workers;
`StreamBatches`), and DataLoader worker w is asked for the steps w, w + K, ...: the data order
depends on K (0 and 1 are the same), the crops and masks do not. Resume starts the iterator at
the resumed step.

Worker count (`num_workers: null`, the default): 0 for small images decoded into memory (the
default CPU job: workers there only take cores from the train step), else one per core of the
process minus one for the train loop (at least 1).
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import torch

from ijepa.masks import Masks, make_generator
from ijepa.train_data import (AUG_STREAM, Augmenter, EncodedBatches, MemoryBatches, ShardInfo, StreamBatches,
                              load_train_images, photo_crops, to_float)
from ijepa.config import ConfigError

__all__ = ["TrainInput", "StepMasks", "default_workers"]


def default_workers(decoded_in_memory: bool, nproc: int) -> int:
    if decoded_in_memory:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, nproc) - 1)


class StepMasks:
    """The masks of one step for one rank: the global batch's from make_generator(seed, step), rows of the rank."""

    def __init__(self, masker: Any, seed: int, global_batch: int, rank: int, world_size: int):
        self.masker, self.seed, self.global_batch = masker, seed, global_batch
        self.rank, self.world_size, self.local = rank, world_size, global_batch // world_size

    def __call__(self, step: int) -> Masks:
        m = self.masker(self.global_batch, make_generator(self.seed, step))
        if self.world_size > 1:
            lo, hi = self.rank * self.local, (self.rank + 1) * self.local
            m = Masks(context=m.context[:, lo:hi], targets=m.targets[:, lo:hi], grid=m.grid, target_hw=m.target_hw,
                      context_hw=m.context_hw, context_counts=m.context_counts[:, lo:hi],
                      context_valid=None if m.context_valid is None else m.context_valid[:, lo:hi])
        return m


class _Crops:
    """Raw batch of a step -> images: float [0, 1] crops of decoded squares (`Augmenter`), or uint8
    crops of encoded photos (`photo_crops`, from the same draws)."""

    def __init__(self, augment: Augmenter, info: ShardInfo):
        self.augment, self.info = augment, info

    def __call__(self, raw: Any, step: int) -> torch.Tensor:
        if isinstance(raw, torch.Tensor):
            return self.augment(raw, step)
        a = self.augment
        u = None
        if a.enabled:
            g = make_generator(AUG_STREAM, a.seed, step)
            u = torch.rand(a.global_batch, 10, 4, generator=g, dtype=torch.float64)  # as crop_params draws
            u = u[a.rank * a.local:(a.rank + 1) * a.local]
        return photo_crops(raw, u, self.info.image_size, self.info.channels, a.scale, a.ratio)


class _IndexedSteps(torch.utils.data.Dataset):
    """Map-style: item `step` = (images, masks) of that step (in-memory readers)."""

    def __init__(self, reader: Any, crops: _Crops, masks: StepMasks):
        self.reader, self.crops, self.masks = reader, crops, masks

    def __getitem__(self, step: int) -> tuple[torch.Tensor, Masks]:
        epoch, k = divmod(step, self.reader.steps_per_epoch)
        return self.crops(self.reader.batch(epoch, k), step), self.masks(step)


class _StreamedSteps(torch.utils.data.IterableDataset):
    """Iterable: worker w of K yields the steps start + w, start + w + K, ... < total (streaming reader)."""

    def __init__(self, reader: StreamBatches, crops: _Crops, masks: StepMasks, start: int, total: int):
        super().__init__()
        self.reader, self.crops, self.masks, self.start, self.total = reader, crops, masks, start, total

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Masks]]:
        from ijepa.data import reader as rd

        info = torch.utils.data.get_worker_info()
        w, k_workers = (0, 1) if info is None else (info.id, info.num_workers)
        spe, streams = self.reader.steps_per_epoch, self.reader.streams
        if max(1, k_workers) != streams:
            raise RuntimeError(f"{k_workers} loader workers for {streams} sample streams")
        current, gen = None, None
        for step in range(self.start + w, self.total, max(1, k_workers)):
            epoch, k = divmod(step, spe)
            if current != (epoch, k % streams):
                current, gen = (epoch, k % streams), self.reader.raw_batches(epoch, k % streams, k)
            raw = next(gen)
            if not self.reader.info.photo:
                raw = torch.stack([rd.decode_sample(s, self.reader.info.channels)[0] for s in raw])
            else:
                raw = [rd._image_bytes(s) for s in raw]
            yield self.crops(raw, step), self.masks(step)


class TrainInput:
    """The reader of a run and its step iterator (see the module docstring)."""

    def __init__(self, cfg: Any, shards: ShardInfo, masker: Any, global_batch: int, rank: int, world_size: int,
                 device: torch.device):
        self.cfg, self.shards, self.device = cfg, shards, device
        d = cfg.data
        self.mode = d.mode if d.mode != "auto" else (
            "memory" if shards.train_bytes <= d.memory_limit_mb * 2 ** 20 else "stream")
        decoded = self.mode == "memory" and not shards.photo
        self.num_workers = cfg.num_workers if cfg.num_workers is not None else default_workers(decoded, cfg.nproc)
        if self.mode == "memory" and shards.photo:
            self.reader: Any = EncodedBatches(shards, global_batch, rank, world_size, cfg.seed)
        elif self.mode == "memory":
            images = load_train_images(shards)
            expect = (shards.channels, shards.image_size, shards.image_size)
            if tuple(images.shape[1:]) != expect:
                raise ConfigError(f"{shards.root}: train images are {tuple(images.shape[1:])}, "
                                  f"the manifest says {expect}")
            self.reader = MemoryBatches(images, global_batch, rank, world_size, cfg.seed)
        else:
            self.reader = StreamBatches(shards, global_batch, rank, world_size, cfg.seed, self.num_workers,
                                        d.shuffle_buffer)
        self.steps_per_epoch = self.reader.steps_per_epoch
        a = cfg.augmentation
        self.crops = _Crops(Augmenter(a.enabled, a.scale, a.ratio, cfg.seed, global_batch, rank, world_size), shards)
        self.masks = StepMasks(masker, cfg.seed, global_batch, rank, world_size)

    def batches(self, start: int, total: int) -> Iterator[tuple[torch.Tensor, Masks]]:
        """(images, masks) of the steps start .. total - 1, in order, on the CPU (pinned for CUDA)."""
        if self.mode == "stream":
            data: Any = _StreamedSteps(self.reader, self.crops, self.masks, start, total)
            sampler = None
        else:
            data, sampler = _IndexedSteps(self.reader, self.crops, self.masks), range(start, total)
        k = self.num_workers
        loader = torch.utils.data.DataLoader(
            data, batch_size=None, sampler=sampler, num_workers=k, pin_memory=self.device.type == "cuda",
            persistent_workers=k > 0, prefetch_factor=self.cfg.data.prefetch if k > 0 else None,
            # its own generator: creating the loader must not draw from the global torch RNG, which
            # drop_path uses (a resumed run creates it at another step than an uninterrupted one)
            generator=torch.Generator().manual_seed(0))
        return iter(loader)

    def to_device(self, images: torch.Tensor, masks: Masks) -> tuple[torch.Tensor, Masks]:
        x = images.to(self.device, non_blocking=True)
        return (to_float(x) if x.dtype == torch.uint8 else x), masks.to(self.device, non_blocking=True)
