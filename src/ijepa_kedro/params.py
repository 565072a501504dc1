"""Per-dataset parameters: a `common` block deep-merged with the dataset's own block.

    pretrain:
      common: {...}          # every dataset
      fashion_mnist: {...}   # overrides for one dataset

`tuned_masks.<dataset>` (conf/base/parameters_tuned.yml, written by `make apply-best`)
is merged last into the pretraining masks, so DVC sees a tuned winner as a parameter change.
"""
from __future__ import annotations

from typing import Any, Mapping

from ijepa.config import ConfigError, deep_merge

__all__ = ["for_dataset", "pretrain_params"]


def for_dataset(section: Mapping[str, Any], dataset: str, name: str) -> dict[str, Any]:
    """`section.common` deep-merged with `section.<dataset>`; the dataset block must exist."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"parameters `{name}` must be a mapping, got {type(section).__name__}")
    if dataset not in section:
        known = sorted(k for k in section if k != "common")
        raise ConfigError(f"parameters `{name}` have no block for dataset {dataset!r}; known: {known} "
                          f"(add `{name}.{dataset}: {{}}` to conf/base/parameters_{name}.yml)")
    return deep_merge(dict(section.get("common") or {}), dict(section[dataset] or {}))


def pretrain_params(section: Mapping[str, Any], tuned: Mapping[str, Any] | None, dataset: str) -> dict[str, Any]:
    params = for_dataset(section, dataset, "pretrain")
    best = (tuned or {}).get(dataset) or {}
    if best:
        params = deep_merge(params, {"masks": dict(best)})
    return params
