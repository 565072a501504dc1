"""The one resolver from the parameter files: common + dataset block, tuned masks, overrides."""
from __future__ import annotations

import pytest

from ijepa.config import ConfigError
from ijepa.params import for_dataset, pretrain_mapping, probe_mapping, read_parameters, shard_mapping
from ijepa.train_config import load_config


def test_the_project_parameters_resolve_to_valid_configs_for_every_dataset():
    from conftest import ROOT

    params = read_parameters([ROOT / "conf" / "base"])
    for dataset in ("scenes", "fashion_mnist", "imagefolder"):
        cfg = load_config(pretrain_mapping(params, dataset))
        assert cfg.method == "ijepa"
        assert probe_mapping(params, dataset)["n_last"] == 4
        assert shard_mapping(params, dataset)["dataset"] == dataset
    assert load_config(pretrain_mapping(params, "fashion_mnist")).optimisation.batch_size == 32


def test_dataset_block_then_tuned_masks_then_overrides(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "local").mkdir()
    (tmp_path / "base" / "parameters_pretrain.yml").write_text(
        "pretrain:\n  common: {seed: 1, masks: {npred: 4, min_keep: 10}}\n  a: {seed: 2}\n")
    (tmp_path / "base" / "parameters_tuned.yml").write_text("tuned_masks:\n  a: {npred: 3}\n")
    (tmp_path / "local" / "parameters_pretrain.yml").write_text("pretrain:\n  a: {log_every: 7}\n")
    params = read_parameters([tmp_path / "base", tmp_path / "local", tmp_path / "absent"])
    out = pretrain_mapping(params, "a", {"masks": {"min_keep": 4}})
    assert out == {"seed": 2, "log_every": 7, "masks": {"npred": 3, "min_keep": 4}}


def test_errors_name_the_file_or_the_missing_block(tmp_path):
    with pytest.raises(ConfigError, match=r"parameters `pretrain` have no block for dataset 'b'; known: \['a'\]"):
        for_dataset({"common": {}, "a": {}}, "b", "pretrain")
    (tmp_path / "parameters_bad.yml").write_text("pretrain: [1, 2\n")
    with pytest.raises(ConfigError, match=r"parameters_bad\.yml: not valid YAML"):
        read_parameters([tmp_path])
    (tmp_path / "parameters_bad.yml").write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"parameters_bad\.yml: expected a mapping"):
        read_parameters([tmp_path])
    # a probe's encoder_path is not a probe setting
    assert probe_mapping({"probe": {"encoder_path": "x", "common": {"seed": 1}, "a": {}}}, "a") == {"seed": 1}
