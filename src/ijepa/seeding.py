"""Every seed the project derives, in one place.

Two mechanisms, kept apart because data order, scene content and masks already depend on
their exact values (shards are byte-identical across runs; resume replays the same masks):

- ``derive_seed`` / ``stream_seed``: a 63-bit integer from blake2b over a domain label and the
  parts written as decimal text. One implementation (`_blake2b_seed`); the two names differ only
  in their label ("ijepa-masks" / "ijepa-data"), so the training loop's streams (masks, crops,
  data order: ``make_generator``) and the WebDataset reader's shuffles never draw the same
  numbers from the same parts; and in how parts are written (derive_seed takes integers,
  stream_seed also takes strings such as "shards").
- ``rng_for``: a numpy Generator seeded from a list of integers (strings become their crc32,
  ``split_code``) through numpy's SeedSequence. The data sources draw scenes and carve splits
  with it; it is not a blake2b mix, so it cannot be expressed through the functions above
  without changing every generated image.
"""
from __future__ import annotations

import hashlib
import zlib
from typing import Iterable

import numpy as np
import torch

__all__ = ["derive_seed", "make_generator", "stream_seed", "split_code", "rng_for"]


def _blake2b_seed(domain: bytes, texts: Iterable[str]) -> int:
    """63 bits of blake2b over ``domain + b":" + ",".join(texts)`` (little-endian, top bit dropped)."""
    data = domain + b":" + b",".join(t.encode() for t in texts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (e.g. (seed, step)); no collisions like (1,2)/(2,1)."""
    return _blake2b_seed(b"ijepa-masks", (str(int(p)) for p in parts))


def make_generator(*parts: int) -> torch.Generator:
    """A CPU torch.Generator seeded from `derive_seed(*parts)`, e.g. make_generator(seed, step)."""
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


def stream_seed(*parts: int | str) -> int:
    """A 63-bit seed mixed from (seed, epoch, rank, worker, stage name ...) for the shard reader."""
    return _blake2b_seed(b"ijepa-data", (str(p) for p in parts))


def split_code(split: str) -> int:
    """A stable integer for a split name (crc32), used in seeds so splits draw independently."""
    return zlib.crc32(split.encode("utf-8"))


def rng_for(*parts: int | str) -> np.random.Generator:
    """numpy Generator seeded from integers/strings, e.g. rng_for(seed, "train", index)."""
    ints = [split_code(p) if isinstance(p, str) else int(p) for p in parts]
    return np.random.default_rng(ints)
