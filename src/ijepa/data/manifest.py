"""A shard folder's manifest.json: loading it, its splits and shard lists, and verifying
every listed shard's presence, size and sha256 against it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ijepa.data.location import (ManifestMissingError, ShardError, UrlRoot, is_remote, iter_tar_samples, read_bytes,
                                 shard_root)
from ijepa.hashing import file_sha256

__all__ = ["MANIFEST", "ShardError", "ManifestMissingError", "UnknownSplitError", "load_manifest", "verify_shards",
           "split_urls", "split_size", "label_names", "shard_root", "split_info", "shard_entries", "manifest_bytes", "UrlRoot"]

MANIFEST = "manifest.json"


class UnknownSplitError(ShardError, KeyError):
    """The manifest has no such split."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def manifest_bytes(shard_dir: str | Path) -> bytes:
    """The raw manifest.json of a shard folder or URL (ManifestMissingError naming where)."""
    root = shard_root(shard_dir)
    path = root / MANIFEST
    if not is_remote(root):
        if not path.is_file():
            raise ManifestMissingError(f"no shard manifest at {path} (shards not written yet, or an interrupted "
                                       f"write: run the shard stage again)")
        return path.read_bytes()
    try:
        data = read_bytes(path)
    except (OSError, ShardError) as err:
        raise ManifestMissingError(f"no shard manifest at {path} ({err})") from None
    if not data:
        raise ManifestMissingError(f"no shard manifest at {path} (empty answer)")
    return data


def load_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """manifest.json of `shard_dir` (a folder or URL) as a dict (ManifestMissingError / ShardError naming it)."""
    path = shard_root(shard_dir) / MANIFEST
    data = manifest_bytes(shard_dir)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ShardError(f"{path}: not a shard manifest (no 'splits' mapping)")
    return manifest


def split_info(manifest: dict[str, Any], split: str, where: Any) -> dict[str, Any]:
    splits = manifest["splits"]
    if split not in splits:
        raise UnknownSplitError(f"{where}: no split {split!r} in the manifest (has {sorted(splits)})")
    return splits[split]


def shard_entries(info: dict[str, Any], where: Any) -> list[dict[str, Any]]:
    """The split's shard records ({"name", "samples", "bytes", "sha256"}); bare file names
    (hand-written manifests) are accepted as {"name": ...}."""
    out = []
    for s in info.get("shards", []):
        if isinstance(s, str):
            out.append({"name": s})
        elif isinstance(s, dict) and isinstance(s.get("name"), str):
            out.append(s)
        else:
            raise ShardError(f"{where}: bad shard entry {s!r} in the manifest")
    return out


def split_urls(shard_dir: str | Path, split: str) -> list[str]:
    """Paths of the split's shards in manifest (= writing) order."""
    root = shard_root(shard_dir)
    info = split_info(load_manifest(root), split, root)
    return [str(root / s["name"]) for s in shard_entries(info, root)]


def split_size(shard_dir: str | Path, split: str) -> int:
    root = shard_root(shard_dir)
    return int(split_info(load_manifest(root), split, root)["samples"])


def label_names(manifest: dict[str, Any]) -> list[str]:
    """The label keys the shards carry (e.g. ["cls", "count", "depth"]): the keys of the
    manifest's label schema (or an explicit "label_fields" list)."""
    fields = manifest.get("label_fields")
    if isinstance(fields, list):
        return [str(f) for f in fields]
    return list(manifest.get("labels") or {})


def verify_shards(shard_dir: str | Path, splits: Sequence[str] | None = None) -> dict[str, Any]:
    """Check that every shard listed in the manifest exists with the recorded size and sha256.

    Returns the manifest. Raises ManifestMissingError, or ShardError naming the first bad file."""
    root = shard_root(shard_dir)
    manifest = load_manifest(root)
    names = list(manifest["splits"]) if splits is None else list(splits)
    for split in names:
        info = split_info(manifest, split, root)
        total = 0
        for s in shard_entries(info, root):
            path = root / s["name"]
            if is_remote(root):  # read it once, hashing as it streams
                if not all(k in s for k in ("bytes", "sha256", "samples")):
                    raise ShardError(f"{root / MANIFEST}: shard {s['name']} has no recorded bytes/sha256/samples")
                for _ in iter_tar_samples(path, s):
                    pass
                total += int(s["samples"])
                continue
            if not path.is_file():
                raise ShardError(f"missing shard {path} (listed in {root / MANIFEST}, split {split!r})")
            if not all(k in s for k in ("bytes", "sha256", "samples")):
                raise ShardError(f"{root / MANIFEST}: shard {s['name']} has no recorded bytes/sha256/samples; "
                                 f"cannot verify it")
            size = path.stat().st_size
            if size != s["bytes"]:
                raise ShardError(f"shard {path} has {size} bytes, the manifest says {s['bytes']} (altered or "
                                 f"truncated)")
            digest = file_sha256(path)
            if digest != s["sha256"]:
                raise ShardError(f"shard {path} sha256 {digest} does not match the manifest ({s['sha256']}): "
                                 f"the file was altered")
            total += int(s["samples"])
        if total != int(info["samples"]):
            raise ShardError(f"{root / MANIFEST}: split {split!r} lists {total} samples in its shards but "
                             f"{info['samples']} in total")
    return manifest
