"""The longer job (`make run-full`): the Kedro environment conf/full, deep-merged over conf/base
as ijepa.params merges parameter folders, writing under data/full/ instead of the DVC-tracked data/."""
from __future__ import annotations

from kedro.config import OmegaConfigLoader

from conftest import ROOT
from ijepa.params import pretrain_mapping, probe_mapping, read_parameters, shard_mapping
from ijepa.train_config import load_config


def _loader(env: str) -> OmegaConfigLoader:
    from ijepa_kedro.settings import CONFIG_LOADER_ARGS

    args = {**CONFIG_LOADER_ARGS, "default_run_env": env}
    return OmegaConfigLoader(conf_source=str(ROOT / "conf"), env=env, runtime_params={"dataset": "scenes"}, **args)


def test_kedro_loads_the_full_environment_as_the_library_resolver_does():
    loader = _loader("full")
    kedro_params = loader["parameters"]
    ours = read_parameters([ROOT / "conf" / "base", ROOT / "conf" / "full"])
    assert kedro_params == ours
    base = read_parameters([ROOT / "conf" / "base"])
    for dataset in ("scenes", "fashion_mnist"):
        full_cfg = load_config(pretrain_mapping(ours, dataset))
        base_cfg = load_config(pretrain_mapping(base, dataset))
        # the longer job trains longer, and everything it does not change stays the default's
        assert full_cfg.optimisation.total_steps > base_cfg.optimisation.total_steps
        assert full_cfg.masks == base_cfg.masks and full_cfg.loss == base_cfg.loss
        assert probe_mapping(ours, dataset)["weight_decays"] == probe_mapping(base, dataset)["weight_decays"]
        assert shard_mapping(ours, dataset)["source"] == shard_mapping(base, dataset)["source"]


def test_the_full_environment_writes_outside_the_dvc_tracked_folders():
    base_cat, full_cat = _loader("local")["catalog"], _loader("full")["catalog"]
    assert base_cat["shard_dir"]["path"] == "data/02_shards/scenes"
    assert full_cat["shard_dir"]["path"] == "data/full/02_shards/scenes"
    for name, entry in full_cat.items():
        paths = [v for k, v in _walk(entry) if k in ("path", "filepath")]
        assert all(p.startswith("data/full/") for p in paths), (name, paths)


def _walk(entry):
    if isinstance(entry, dict):
        for k, v in entry.items():
            if isinstance(v, dict):
                yield from _walk(v)
            else:
                yield k, v
