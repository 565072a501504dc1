"""Discovers the pipelines in the top-level `pipelines/` folder.

Kedro's `find_pipelines` only looks inside the project package, so each folder
`pipelines/<name>/pipeline.py` exposing `create_pipeline()` is imported here by name.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from kedro.pipeline import Pipeline

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PIPELINES_DIR = PROJECT_ROOT / "pipelines"


def pipeline_names() -> list[str]:
    return sorted(p.parent.name for p in PIPELINES_DIR.glob("*/pipeline.py"))


def register_pipelines() -> dict[str, Pipeline]:
    # The top-level folder is not an installed package: make the project root importable.
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    pipes: dict[str, Pipeline] = {}
    for name in pipeline_names():
        module = importlib.import_module(f"pipelines.{name}.pipeline")
        pipes[name] = module.create_pipeline()
    # The default run is the end-to-end chain for one dataset; DVC runs stages one by one.
    default = [pipes[n] for n in ("shard", "pretrain", "probe") if n in pipes]
    pipes["__default__"] = sum(default, Pipeline([])) if default else Pipeline([])
    return pipes
