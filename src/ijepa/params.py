"""One resolver from the parameter files to typed configs, shared by the Kedro nodes, the
tune CLI and the benchmarks.

Every section of ``conf/base/parameters_<name>.yml`` is a `common` block plus one block per
dataset::

    pretrain:
      common: {...}          # every dataset
      fashion_mnist: {...}   # overrides for one dataset

A dataset's mapping is ``common`` deep-merged with its own block; for pretraining,
``tuned_masks.<dataset>`` (conf/base/parameters_tuned.yml, written by ``make apply-best``)
is merged into ``masks`` after that, and the caller's overrides last.

The mappings become typed configs where they are defined, which also checks them and names a
bad field: ``ijepa.train_config.load_config`` (pretraining), ``ijepa.probes.ProbeConfig`` and
``ijepa.data.config.ShardConfig`` through ``ijepa.config.from_mapping``. This module imports
none of them, so a stage that only shards does not depend on the trainer's code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ijepa.config import ConfigError, deep_merge

__all__ = ["read_parameters", "for_dataset", "pretrain_mapping", "visualise_mapping", "probe_mapping",
           "shard_mapping", "DEFAULT_CONF_DIRS"]

DEFAULT_CONF_DIRS = ("conf/base", "conf/local")


def read_parameters(conf_dirs: Sequence[str | Path] = DEFAULT_CONF_DIRS) -> dict[str, Any]:
    """The ``parameters*.yml`` files of `conf_dirs` merged, later folders over earlier ones
    (as Kedro's config loader does); missing folders are skipped."""
    import yaml

    out: dict[str, Any] = {}
    for d in conf_dirs:
        if not Path(d).is_dir():
            continue
        for f in sorted(Path(d).glob("parameters*.yml")):
            try:
                loaded = yaml.safe_load(f.read_text()) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{f}: not valid YAML: {err}") from None
            if not isinstance(loaded, Mapping):
                raise ConfigError(f"{f}: expected a mapping at the top level, got {type(loaded).__name__}")
            out = deep_merge(out, loaded)
    return out


def for_dataset(section: Mapping[str, Any] | None, dataset: str, name: str) -> dict[str, Any]:
    """`section.common` deep-merged with `section.<dataset>`; the dataset block must exist."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"parameters `{name}` must be a mapping, got {type(section).__name__}")
    if dataset not in section:
        known = sorted(k for k in section if k != "common")
        raise ConfigError(f"parameters `{name}` have no block for dataset {dataset!r}; known: {known} "
                          f"(add `{name}.{dataset}: {{}}` to conf/base/parameters_{name}.yml)")
    return deep_merge(dict(section.get("common") or {}), dict(section[dataset] or {}))


def pretrain_mapping(params: Mapping[str, Any], dataset: str,
                     overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`params` holds the sections ``pretrain`` and (optionally) ``tuned_masks``; the
    ``visualise`` block is not a training setting (`visualise_mapping`)."""
    out = for_dataset(params.get("pretrain"), dataset, "pretrain")
    out.pop("visualise", None)
    best = (params.get("tuned_masks") or {}).get(dataset) or {}
    if best:
        out = deep_merge(out, {"masks": dict(best)})
    return deep_merge(out, dict(overrides or {}))


def visualise_mapping(params: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """``pretrain.<dataset>.visualise`` (common merged with the dataset's block): the settings of
    the predictor visualisation after pretraining (`ijepa.predictions.VisualiseConfig`)."""
    return dict(for_dataset(params.get("pretrain"), dataset, "pretrain").get("visualise") or {})


def probe_mapping(params: Mapping[str, Any], dataset: str,
                  overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`params` holds the section ``probe``; its ``encoder_path`` and ``device`` are not probe settings."""
    section = {k: v for k, v in (params.get("probe") or {}).items() if k not in ("encoder_path", "device")}
    return deep_merge(for_dataset(section, dataset, "probe"), dict(overrides or {}))


def shard_mapping(params: Mapping[str, Any], dataset: str,
                  overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`params` holds the section ``shard``; the manifest records `dataset` as its name."""
    return deep_merge({"dataset": dataset, **for_dataset(params.get("shard"), dataset, "shard")},
                      dict(overrides or {}))
