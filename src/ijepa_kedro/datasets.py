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
        from ijepa.data.location import shard_root

        self._path = shard_root(path)  # a folder, or a URL (http(s)://, pipe:, s3:// ...) to read from
        self._verify = verify

    def _load(self) -> Any:
        from ijepa.data.reader import verify_shards

        if self._verify:
            verify_shards(self._path)  # a URL: every shard streamed once and hashed
        return self._path

    def _save(self, data: Any) -> None:
        if not self._exists():
            raise DatasetError(f"{self._path}/manifest.json was not written by the node")

    def _exists(self) -> bool:
        from ijepa.data.location import is_remote
        from ijepa.data.manifest import ShardError, load_manifest

        if not is_remote(self._path):
            return (self._path / "manifest.json").is_file()
        try:
            load_manifest(self._path)
        except ShardError:
            return False
        return True

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "verify": self._verify}


class EncoderDataset(AbstractDataset[Any, Path]):
    """An exported encoder folder (encoder.safetensors + encoder.json); loads as its path."""

    def __init__(self, path: str):
        self._path = Path(path)

    def _load(self) -> Path:
        # ijepa.load_encoder / run_probes check the files and name the path when they are bad;
        # probes may also be pointed at another encoder, so this one need not exist.
        return self._path

    def _save(self, data: Any) -> None:
        if not self._exists():
            raise DatasetError(f"no exported encoder at {self._path}")

    def _exists(self) -> bool:
        return (self._path / "encoder.safetensors").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class AtomicJSONDataset(AbstractDataset[Any, Any]):
    """A JSON file written atomically (temp + rename): metrics files DVC reads stay whole."""

    def __init__(self, filepath: str, indent: int = 2):
        self._filepath = Path(filepath)
        self._indent = indent

    def _load(self) -> Any:
        import json

        return json.loads(self._filepath.read_text())

    def _save(self, data: Any) -> None:
        from ijepa import atomic

        atomic.write_json(self._filepath, data)

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


class FigureDataset(AbstractDataset[Any, Any]):
    """A matplotlib figure saved as PNG atomically, then closed (save-only)."""

    def __init__(self, filepath: str, dpi: int = 110):
        self._filepath = Path(filepath)
        self._dpi = dpi

    def _load(self) -> Any:
        raise DatasetError(f"{self._filepath}: FigureDataset is save-only")

    def _save(self, fig: Any) -> None:
        import io

        import matplotlib.pyplot as plt

        from ijepa import atomic

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=self._dpi, bbox_inches="tight")
        plt.close(fig)
        atomic.write_bytes(self._filepath, buf.getvalue())

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "dpi": self._dpi}
