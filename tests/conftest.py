"""Helpers shared by several test files (plain functions and constants: `from conftest import ...`).

The pretraining tests share tests/test_train_fixtures.py (tiny shards and configs) instead.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]  # the repository
BENCHMARKS = ROOT / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_encoder_config(**over):
    """A ViT small enough for CPU unit tests: 16x16 grey, 4-pixel patches, width 32, 2 blocks,
    2 heads; keyword arguments override fields (e.g. in_chans=3, img_size=8)."""
    from ijepa.models import EncoderConfig

    fields = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    return EncoderConfig(**{**fields, **over})
