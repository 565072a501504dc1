"""Kedro project settings."""
from kedro.config import OmegaConfigLoader

from ijepa_kedro.hooks import LineageHooks

HOOKS = (LineageHooks(),)
CONFIG_LOADER_CLASS = OmegaConfigLoader
# Parameters of an environment (conf/local, conf/full) are deep-merged over conf/base ("soft"), as
# ijepa.params.read_parameters merges them, so an environment holds only the keys it changes.
CONFIG_LOADER_ARGS = {"base_env": "base", "default_run_env": "local", "merge_strategy": {"parameters": "soft"}}
