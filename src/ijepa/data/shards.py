"""Write a source as WebDataset tar shards + manifest.json, atomically and byte-reproducibly.

``shard_dataset(cfg, out_dir)`` writes ``out_dir/<split>-%06d.tar`` (webdataset
ShardWriter, quiet) with members ``<key>.png`` (or ``.jpg``), ``<key>.cls`` /
``.count`` / ``.depth`` (text ints, those the source labels) and, for imagefolder,
``<key>.json`` ({"path": file relative to the root}), then ``out_dir/manifest.json``.

Atomicity: the new shards are written into a staging folder next to `out_dir`
(``.<name>.staging-<pid>-<random>``), each under ``<shard>.partial`` and renamed to its
final name when complete. Only when every split is done are they moved into `out_dir`:
first the old manifest.json is removed, then old shard files not in the new set are
deleted, the new shards are renamed in, and the new manifest is written last (atomic
write). An exception or kill while writing leaves `out_dir` as it was (and a staging folder
that the next run removes); a kill during the final swap leaves no manifest.json, which
every reader reports. Reproducibility: tar members have mtime 0, fixed owner and mode,
images carry no timestamps, and the manifest holds no times, so the same parameters give
byte-identical shards and manifest (sha256 recorded per shard).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from webdataset import ShardWriter

from ijepa.atomic import write_json
from ijepa.config import ConfigError, as_dict, from_mapping
from ijepa.data.common import Sample, Source, encode_image
from ijepa.data.config import ShardConfig

__all__ = ["ShardResult", "shard_dataset", "make_source", "MANIFEST", "FORMAT_VERSION", "SHARD_PATTERN",
           "shard_name"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_PATTERN = "{split}-%06d.tar"
_SHARD_FILE = re.compile(r"^\.?[A-Za-z0-9_]+-\d{6}\.tar(\.partial)?$")


def shard_name(split: str, index: int) -> str:
    return SHARD_PATTERN.format(split=split) % index


@dataclass
class ShardResult:
    """What `shard_dataset` did.

    manifest: the manifest.json content. samples_per_s: samples written per second (whole
    run). skipped: unusable inputs by reason (all splits). preview: up to cfg.preview
    samples of the first split, (key, uint8 HxWxC image, labels). out_dir: the folder.
    """

    manifest: dict[str, Any]
    samples_per_s: float
    skipped: dict[str, int]
    preview: list[tuple[str, np.ndarray, dict[str, int]]] = field(default_factory=list)
    out_dir: Path | None = None
    seconds: float = 0.0
    samples: int = 0


def make_source(cfg: ShardConfig) -> Source:
    """The source object for `cfg` (opens/lists its inputs, so missing inputs fail here)."""
    if cfg.source == "scenes":
        from ijepa.data.scenes import ScenesSource

        return ScenesSource(cfg.scenes, cfg.size, cfg.seed)
    if cfg.source == "fashion_mnist":
        from ijepa.data.fashion_mnist import FashionMnistSource

        return FashionMnistSource(cfg.fashion_mnist, cfg.size, cfg.seed)
    if cfg.source == "imagefolder":
        from ijepa.data.imagefolder import ImageFolderSource

        return ImageFolderSource(cfg.imagefolder, cfg.size, cfg.seed, cfg.jpeg_quality)
    raise ConfigError(f"ShardConfig.source: unknown source {cfg.source!r}")


class _HashingFile:
    """Write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        if self._fh.closed:  # aborted: the tar stream's finaliser may still flush into us
            return len(data)
        self.sha.update(data)
        self.size += len(data)
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()


class _SplitWriter:
    """ShardWriter into `staging` with temp names (<name>.partial -> <name> when complete).

    The ShardWriter is created on the first sample, so an empty split writes no shard."""

    def __init__(self, staging: Path, split: str, maxcount: int, maxsize: int):
        self.staging, self.split = staging, split
        self.maxcount, self.maxsize = maxcount, maxsize
        self.shards: list[dict[str, Any]] = []
        self._open: dict[str, _HashingFile] = {}
        self.writer: ShardWriter | None = None

    def _opener(self, fname: str) -> _HashingFile:
        fh = _HashingFile(Path(fname + ".partial"))
        self._open[fname] = fh
        return fh

    def _post(self, fname: str) -> None:
        fh = self._open.pop(fname)
        fh.close()
        os.replace(fh.path, fname)
        self.shards.append({"name": Path(fname).name, "samples": int(self.writer.count), "bytes": fh.size,
                            "sha256": fh.sha.hexdigest()})

    def write(self, obj: dict[str, Any]) -> None:
        if self.writer is None:
            self.writer = ShardWriter(str(self.staging / SHARD_PATTERN.format(split=self.split)),
                                      maxcount=self.maxcount, maxsize=self.maxsize, verbose=0,
                                      opener=self._opener, post=self._post, encoder=False, mtime=0,
                                      user="ijepa", group="ijepa", mode=0o444)
        self.writer.write(obj)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def abort(self) -> None:
        for fh in self._open.values():
            with contextlib.suppress(Exception):
                fh._fh.close()
        self._open.clear()


def _encode_sample(s: Sample, cfg: ShardConfig) -> dict[str, Any]:
    import json

    if s.encoded is not None:
        obj: dict[str, Any] = {"__key__": s.key, s.encoded[0]: s.encoded[1]}
    else:
        obj = {"__key__": s.key, cfg.format: encode_image(s.image, cfg.format, cfg.jpeg_quality, cfg.png_compress_level)}
    for k, v in s.labels.items():
        obj[k] = str(int(v)).encode("ascii")
    if s.extra:
        obj["json"] = json.dumps(s.extra, sort_keys=True).encode("utf-8")
    return obj


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_staging(out_dir: Path) -> None:
    pat = re.compile(r"^\." + re.escape(out_dir.name) + r"\.staging-(\d+)-[0-9a-f]+$")
    if not out_dir.parent.is_dir():
        return
    for p in out_dir.parent.iterdir():
        m = pat.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _move(src: Path, dst: Path) -> None:
    """Rename, or (across file systems, e.g. out_dir is a mount point) copy to a temp name + rename."""
    try:
        os.replace(src, dst)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        tmp = dst.parent / f".{dst.name}.partial"
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)


def _swap_in(staging: Path, out_dir: Path, new_names: list[str], manifest: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out_dir / MANIFEST).unlink()  # from here until the end there is no valid manifest
    keep = set(new_names)
    for p in out_dir.iterdir():
        if p.is_file() and _SHARD_FILE.match(p.name) and p.name not in keep:
            p.unlink()
    for name in new_names:
        _move(staging / name, out_dir / name)
    with contextlib.suppress(OSError):  # make the renames durable before the manifest appears
        fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    write_json(out_dir / MANIFEST, manifest)
    with contextlib.suppress(OSError):  # mkstemp creates 0600; make it readable like the shards
        os.chmod(out_dir / MANIFEST, 0o644)


def shard_dataset(cfg: ShardConfig | Mapping[str, Any] | None, out_dir: str | os.PathLike,
                  progress: bool = True) -> ShardResult:
    """Write every split of `cfg`'s source into `out_dir` as tar shards + manifest.json.

    The config is validated and the source opened (inputs listed, idx files read) before
    anything is written; errors: ConfigError (naming the field), IdxError /
    ImageFolderError (naming the path).
    """
    cfg = from_mapping(ShardConfig, cfg, "ShardConfig")
    try:
        cfg.validate()  # also for a ShardConfig built directly
    except ConfigError as err:
        raise ConfigError(f"ShardConfig: {err}") from None
    out_dir = Path(out_dir)
    source = make_source(cfg)
    schema = source.label_schema()
    t0 = time.perf_counter()
    _clean_stale_staging(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    preview: list[tuple[str, np.ndarray, dict[str, int]]] = []
    splits_info: dict[str, dict[str, Any]] = {}
    skipped_total: dict[str, int] = {}
    exts: set[str] = set()
    total = 0
    pool, mapper = _worker_pool(cfg, source)
    try:
        for split in source.splits():
            cap = cfg.max_samples.get(split)
            expected = source.num_samples(split) if cap is None else min(cap, source.num_samples(split))
            writer = _SplitWriter(staging, split, cfg.maxcount, cfg.maxsize)
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=source.num_samples(split), desc=f"{cfg.name}/{split}", unit="file",
                           dynamic_ncols=True, mininterval=0.5)
            n = 0
            try:
                it = source.iter_split(split, mapper=mapper) if mapper is not None else source.iter_split(split)
                for sample in (it if cap is None else islice(it, cap)):
                    if len(preview) < cfg.preview and not splits_info:
                        preview.append((sample.key, _preview_image(sample, cfg.size), dict(sample.labels)))
                    obj = _encode_sample(sample, cfg)
                    exts.update(k for k in ("png", "jpg") if k in obj)
                    writer.write(obj)
                    n += 1
                    if bar is not None:  # files done, written or skipped
                        bar.update(n + sum(source.skipped(split).values()) - bar.n)
                if hasattr(it, "close"):
                    it.close()  # a capped source finishes its bookkeeping (skip counts, warnings) now
                writer.close()
            except BaseException:
                writer.abort()
                raise
            finally:
                if bar is not None:
                    bar.close()
            skipped = source.skipped(split)
            for k, v in skipped.items():
                skipped_total[k] = skipped_total.get(k, 0) + v
            splits_info[split] = {
                "samples": n,
                "num_shards": len(writer.shards),
                "bytes": sum(s["bytes"] for s in writer.shards),
                "shards": writer.shards,
                "skipped": skipped,
            }
            total += n
        manifest = _manifest(cfg, source, schema, splits_info, skipped_total, sorted(exts))
        new_names = [s["name"] for info in splits_info.values() for s in info["shards"]]
        _swap_in(staging, out_dir, new_names, manifest)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - t0
    rate = total / seconds if seconds > 0 else 0.0
    log.info("sharded %s: %d samples in %.1f s (%.0f img/s) into %s; skipped %s", cfg.name, total, seconds,
             rate, out_dir, skipped_total or "none")
    return ShardResult(manifest=manifest, samples_per_s=rate, skipped=dict(sorted(skipped_total.items())),
                       preview=preview, out_dir=out_dir, seconds=seconds, samples=total)


def _worker_pool(cfg: ShardConfig, source: Source):
    """(pool, mapper) for a source that reads/renders in parallel, or (None, None): every core by
    default; ordered imap, so the shards are the same bytes for any number of processes."""
    workers = cfg.workers if cfg.workers is not None else len(os.sched_getaffinity(0))
    if workers <= 1 or not getattr(source, "parallel", False):
        return None, None
    import multiprocessing as mp

    # fork: the workers run PIL/numpy only; spawn would re-import torch in each
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    pool = ctx.Pool(workers)
    return pool, functools.partial(pool.imap, chunksize=8)


def _preview_image(sample: Sample, size: int) -> np.ndarray:
    if sample.image is not None:
        return sample.image
    from ijepa.data.photos import fit_square
    from ijepa.data.reader import decode_image

    return fit_square(decode_image(sample.encoded[1], 3), size)


def _manifest(cfg: ShardConfig, source: Source, schema: dict[str, Any], splits: dict[str, dict[str, Any]],
              skipped: dict[str, int], exts: list[str]) -> dict[str, Any]:
    photo = cfg.source == "imagefolder" and cfg.imagefolder.store == "photo"
    fmt = "+".join(exts) if photo else cfg.format
    image: dict[str, Any] = {"height": cfg.size, "width": cfg.size, "channels": source.channels,
                             "mode": "L" if source.channels == 1 else "RGB", "format": fmt,
                             "jpeg_quality": cfg.jpeg_quality if "jpg" in fmt else None, "dtype": "uint8"}
    if photo:  # whole photos of any size: image_size is the size they are cropped to when read
        image.update(storage="photo", height=None, width=None, max_side=cfg.imagefolder.max_side)
    return {
        "format_version": FORMAT_VERSION,
        "dataset": cfg.name,
        "source": cfg.source,
        "image_size": cfg.size,
        "channels": source.channels,
        "image": image,
        "labels": schema,
        "keys": ["__key__", *(exts if photo else [cfg.format]), *schema.keys()]
        + (["json"] if cfg.source == "imagefolder" else []),
        "shard_pattern": SHARD_PATTERN,
        "seed": cfg.seed,
        "source_params": source.params(),
        "config": as_dict(cfg),
        "splits": splits,
        "samples": sum(s["samples"] for s in splits.values()),
        "skipped": dict(sorted(skipped.items())),
    }
