"""Checkpoints of the reference code (facebookresearch/ijepa, `src/train.py`).

`torch.save` of a dict::

    {"encoder": ..., "predictor": ..., "target_encoder": ..., "opt": ..., "scaler": ...,
     "epoch": int, "loss": float, "batch_size": int, "world_size": int, "lr": float}

The three models are state dicts of DDP-wrapped modules (every name starts with `module.`);
the encoders use the canonical names (`ijepa.interop.common`), with the positional table
stored (`pos_embed`, a frozen parameter) and LayerNorm eps 1e-6. The paper evaluates the
EMA target encoder (`target_encoder`, our default); `encoder` is the context encoder, which
is what timm's `checkpoint_filter_fn` takes from these files.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .common import InteropError, strip_prefix, tensors

__all__ = ["WHICH", "is_official", "read_official"]

WHICH = ("target_encoder", "encoder")
_INFO = ("epoch", "loss", "batch_size", "world_size", "lr")


def is_official(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) for k in WHICH)


def read_official(obj: Mapping[str, Any], which: str, where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The canonical state dict of `obj[which]` and what the checkpoint says about its run."""
    if which not in WHICH:
        raise InteropError(f"--which must be one of {list(WHICH)}, got {which!r}")
    if not isinstance(obj.get(which), Mapping):
        raise InteropError(f"{where}: the checkpoint has no {which!r} state dict (top-level keys "
                           f"{sorted(map(str, obj))}); expected the reference code's {list(WHICH)}")
    state = strip_prefix(tensors(obj[which], f"{where} [{which}]"), "module.")
    info: dict[str, Any] = {"which": which}
    for key in _INFO:
        value = obj.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            info[key] = value
    return state, info

