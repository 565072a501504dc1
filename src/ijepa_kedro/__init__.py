"""Kedro project glue for ijepa: settings, pipeline registry, datasets, hooks.

The library lives in `ijepa` and never imports Kedro; everything Kedro-specific is here
and in the top-level `pipelines/` folder.
"""
