"""Catalog datasets for folders the library writes itself (shards, models, caches).

Large artefacts (tar shards, checkpoints) are written by `ijepa` with its own atomic
writes; the catalog hands nodes the *location* (PathDataset) or a verified view of what
an earlier stage produced (ShardsDataset, EncoderDataset), so that stage boundaries are
persisted catalog entries.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError


class PathDataset(AbstractDataset[Any, Path]):
    """Loads as the (created) folder path; saving is a no-op check that it exists."""

    def __init__(self, path: str, create: bool = True):
        self._path = Path(path)
        self._create = create

    def _load(self) -> Path:
        if self._create:
            self._path.mkdir(parents=True, exist_ok=True)
        return self._path

    def _save(self, data: Any) -> None:
        if not self._path.exists():
            raise DatasetError(f"{self._path} was not written by the node")

    def _exists(self) -> bool:
        return self._path.exists()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class ShardsDataset(AbstractDataset[Any, Path]):
    """A shard folder with manifest.json; loading verifies every shard's sha256."""

    def __init__(self, path: str, verify: bool = True):
        self._path = Path(path)
        self._verify = verify

    def _load(self) -> Path:
        from ijepa.data.reader import verify_shards

        if self._verify:
            verify_shards(self._path)
        return self._path

    def _save(self, data: Any) -> None:
        if not (self._path / "manifest.json").is_file():
            raise DatasetError(f"{self._path}/manifest.json was not written by the node")

    def _exists(self) -> bool:
        return (self._path / "manifest.json").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "verify": self._verify}


class EncoderDataset(AbstractDataset[Any, Path]):
    """An exported encoder folder (encoder.safetensors + encoder.json); loads as its path."""

    def __init__(self, path: str):
        self._path = Path(path)

    def _load(self) -> Path:
        from ijepa.export import CONFIG, WEIGHTS, EncoderFileError

        for name in (WEIGHTS, CONFIG):
            if not (self._path / name).is_file():
                raise EncoderFileError(f"encoder file missing: {self._path / name}")
        return self._path

    def _save(self, data: Any) -> None:
        if not self._exists():
            raise DatasetError(f"no exported encoder at {self._path}")

    def _exists(self) -> bool:
        return (self._path / "encoder.safetensors").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
