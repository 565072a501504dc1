"""Everything checked before a run does any work, done once: the typed config, the shard
folder's manifest (sha256-verified at most once), the model config for its images, the
method's batch masker on its patch grid, and what probes along training need (val split, labels)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ijepa.methods import Masker, Method, get_method
from ijepa.models import ModelConfig
from ijepa.train_config import PretrainConfig, load_config, model_and_masker
from ijepa.train_data import ShardInfo, read_shard_info
from ijepa.trainer.probing import check_monitor_data

__all__ = ["TrainPlan", "prepare"]


@dataclass(frozen=True)
class TrainPlan:
    cfg: PretrainConfig
    shards: ShardInfo
    model: ModelConfig
    masker: Masker

    @property
    def method(self) -> type[Method]:
        return get_method(self.cfg.method)


def prepare(cfg: PretrainConfig | Mapping[str, Any] | None, shard_dir: str | Path | ShardInfo,
            verify: bool | None = None) -> TrainPlan:
    """Validate `cfg` against the shards in `shard_dir` (ConfigError names the field).

    `verify`: check every train shard's sha256 against the manifest (default: the config's
    ``data.verify``); pass False when the caller verified them already. A `ShardInfo` is
    taken as already read."""
    cfg = load_config(cfg)
    if isinstance(shard_dir, ShardInfo):
        shards = shard_dir
    else:
        shards = read_shard_info(shard_dir, verify=cfg.data.verify if verify is None else verify)
    model, masker = model_and_masker(cfg, shards.image_size, shards.channels, shards.train_samples,
                                     str(shards.root / "manifest.json"))
    if cfg.monitor.enabled:
        from ijepa.data.reader import load_manifest

        check_monitor_data(cfg.monitor, load_manifest(shards.root), model.encoder.depth,
                           str(shards.root / "manifest.json"))
    return TrainPlan(cfg, shards, model, masker)
