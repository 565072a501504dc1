"""torch.compile for the train step: when it is on, and how the step avoids recompiling.

``compile: auto`` compiles on CUDA and runs eagerly on CPU (there the compile time is repaid
only by long runs); true / false force it. The mask lists change length every step (the
target block size is drawn per batch; under ``truncate`` the context length is the batch's
shortest, under ``pad`` its longest), so their token dimension is marked dynamic before the
first compiled call: one graph serves every length instead of one compile per length.
`compile_counters` reads dynamo's counters (graphs compiled, recompiles) for tests and the
GPU benchmark.
"""
from __future__ import annotations

from typing import Any

import torch

from ijepa.masks import Masks

__all__ = ["resolve_compile", "mark_mask_dims_dynamic", "compile_counters"]


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def mark_mask_dims_dynamic(masks: Masks) -> None:
    """The token dimension of the context / target lists (and of the padding mask) is dynamic."""
    for t in (masks.context, masks.targets, masks.context_valid):
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, t.ndim - 1)


def compile_counters() -> dict[str, Any]:
    """Graphs dynamo compiled and recompiles it made so far in this process."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0,
            "graph_breaks": int(sum(counters["graph_break"].values())) if "graph_break" in counters else 0}
