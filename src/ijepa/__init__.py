"""I-JEPA: self-supervised image pretraining, as a library (no Kedro import here)."""
from __future__ import annotations

__version__ = "0.1.0"


def load_encoder(path, map_location: str = "cpu"):
    """Load an exported target encoder (safetensors + JSON config) in one call."""
    from ijepa.export import load_encoder as _load

    return _load(path, map_location=map_location)


__all__ = ["__version__", "load_encoder"]
