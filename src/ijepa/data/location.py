"""Where a shard folder lives: a local folder or a URL, and reading its tars as a stream.

A shard location is what webdataset opens, plus fsspec: a local path, ``file:/abs/dir``,
``pipe:CMD`` (the file name is appended as ``/<name>``, or replaces ``{name}`` in CMD, e.g.
``pipe:aws s3 cp s3://bucket/shards/{name} -``), ``http(s)://host/dir`` (webdataset's gopen,
through curl), and any other fsspec URL (``s3://``, ``gs://``, ``az://``, ...; the protocol's
package comes with the optional extras ``pip install .[s3]`` / ``.[gs]`` / ``.[azure]``).

`iter_tar_samples` reads one tar front to back, groups members by key into samples and hashes
every byte as it goes: at the end of the shard its size and sha256 are compared with the
manifest's record, and a mismatch raises `ShardError` naming the shard (so a run stops there).
"""
from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

__all__ = ["UrlRoot", "shard_root", "is_remote", "open_url", "read_bytes", "iter_tar_samples", "ShardError",
           "ManifestMissingError"]


class ShardError(RuntimeError):
    """A shard folder is missing, incomplete, altered or does not match its manifest."""


class ManifestMissingError(ShardError, FileNotFoundError):
    """No manifest.json (never written, or a write was interrupted)."""


class UrlRoot(str):
    """A remote shard folder; ``root / name`` is the URL of one of its files."""

    def __truediv__(self, name: str) -> "UrlRoot":
        s = str(self)
        if s.startswith("pipe:") and "{name}" in s:
            return UrlRoot(s.replace("{name}", name))
        return UrlRoot(s.rstrip("/") + "/" + name)

    @property
    def name(self) -> str:
        s = str(self).rstrip("/")
        if s.startswith("pipe:"):
            s = s.split()[-1] if s.split() else s
        return s.rsplit("/", 1)[-1]


def shard_root(location: str | Path) -> Path | UrlRoot:
    """A local Path (paths and ``file:`` URLs) or a UrlRoot (``pipe:`` and ``scheme://`` URLs)."""
    if isinstance(location, Path):
        return location
    s = str(location)
    if s.startswith("file:"):
        return Path(url2pathname(urlparse(s).path))
    if s.startswith("pipe:") or "://" in s:
        return UrlRoot(s)
    return Path(s)


def is_remote(root: Any) -> bool:
    return isinstance(root, UrlRoot)


def open_url(url: str | Path) -> BinaryIO:
    """A binary stream of one file: local open, webdataset's gopen (pipe:, http(s)), else fsspec."""
    if not isinstance(url, UrlRoot) and not (isinstance(url, str) and (url.startswith("pipe:") or "://" in url)):
        return open(shard_root(url), "rb")
    s = str(url)
    scheme = "pipe" if s.startswith("pipe:") else urlparse(s).scheme
    if scheme in ("pipe", "http", "https"):
        from webdataset.gopen import gopen

        return gopen(s, "rb")
    try:
        import fsspec

        return fsspec.open(s, "rb").open()
    except ImportError as err:  # fsspec knows the protocol but its package is not installed
        raise ShardError(f"cannot open {s}: {err} (install the optional extra, e.g. pip install '.[s3]')") from None
    except ValueError as err:
        raise ShardError(f"cannot open {s}: {err}") from None


def _close(stream: Any) -> None:
    """Close a stream; a pipe's command (curl, cat) that failed raises here."""
    stream.close()


def read_bytes(url: str | Path) -> bytes:
    """The whole file; OSError/ShardError from the opener or a failed pipe command."""
    stream = open_url(url)
    try:
        data = stream.read()
    finally:
        _close(stream)
    return data


class _Hashing:
    """Read-only stream wrapper that hashes and counts every byte read."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.sha, self.size = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def iter_tar_samples(url: str | Path, expect: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Samples ({"__key__", "__url__", ext: bytes}) of one tar, in order.

    `expect`: the manifest's record of the shard ({"bytes", "sha256"}); checked once the whole
    file has been read (ShardError naming the shard on a mismatch)."""
    try:
        stream = open_url(url)
    except OSError as err:
        raise ShardError(f"shard {url}: cannot open ({err})") from None
    h = _Hashing(stream)
    sample: dict[str, Any] | None = None
    complete = False
    try:
        try:
            with tarfile.open(fileobj=h, mode="r|") as tf:  # type: ignore[call-overload]
                for m in tf:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.rsplit("/", 1)[-1].partition(".")
                    if sample is not None and sample["__key__"] != key:
                        yield sample
                        sample = None
                    if sample is None:
                        sample = {"__key__": key, "__url__": str(url)}
                    fh = tf.extractfile(m)
                    sample[ext] = fh.read() if fh is not None else b""
            h.drain()
            complete = True
        finally:
            try:
                _close(stream)
            except OSError as err:  # the pipe's command failed (curl: 404, connection refused, ...)
                if complete:  # closed early (consumer stopped): the command was cut off, not an error
                    raise ShardError(f"shard {url}: cannot read ({err})") from None
    except (tarfile.TarError, OSError) as err:
        raise ShardError(f"shard {url}: cannot read ({err})") from None
    if sample is not None:
        yield sample
    if expect and "sha256" in expect:
        if "bytes" in expect and h.size != int(expect["bytes"]):
            raise ShardError(f"shard {url} has {h.size} bytes, the manifest says {expect['bytes']} (altered or "
                             f"truncated)")
        digest = h.sha.hexdigest()
        if digest != expect["sha256"]:
            raise ShardError(f"shard {url} sha256 {digest} does not match the manifest ({expect['sha256']}): the "
                             f"file was altered")
