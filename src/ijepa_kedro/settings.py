"""Kedro project settings."""
import os

from kedro.config import OmegaConfigLoader

from ijepa_kedro.hooks import LineageHooks


def tracking_root() -> str:
    """The folder whose mlflow.db the runs go to: the DVC repository when DVC runs the stage
    (DVC_ROOT; a queued `dvc exp run` works in a temporary copy, and its runs must land beside
    the others, not in a copy deleted afterwards), else the current folder (the project root)."""
    return os.environ.get("DVC_ROOT") or "."


HOOKS = (LineageHooks(),)
CONFIG_LOADER_CLASS = OmegaConfigLoader
# Parameters of an environment (conf/local, conf/full) are deep-merged over conf/base ("soft"), as
# ijepa.params.read_parameters merges them, so an environment holds only the keys it changes.
CONFIG_LOADER_ARGS = {"base_env": "base", "default_run_env": "local", "merge_strategy": {"parameters": "soft"},
                      "custom_resolvers": {"tracking_root": tracking_root}}
