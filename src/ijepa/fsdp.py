"""Sharded training (``distributed: fsdp``) with torch's composable FSDP2 (`fully_shard`), and the
full-tensor state helpers that make its checkpoints the same as a single process's.

Every transformer block is its own FSDP unit (its parameters are all-gathered just before
its forward and backward and freed after), then each top-level module; the EMA target
encoder is sharded the same way, so that the EMA update is a local operation on equally
sharded tensors. Roots reshard after forward too, so between steps every parameter is a
sharded DTensor.

Checkpoints hold FULL tensors, keyed as in a single process (`full_state_dict`,
`full_optimizer_state`: collectives, every rank calls them in the same order), so a run
can resume under DDP, FSDP or one process alike.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

__all__ = ["shard_modules", "is_sharded", "local", "reshard", "full_state_dict", "load_full_state_dict",
           "full_optimizer_state", "load_full_optimizer_state", "set_gradient_sync", "cpu_copy"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def is_sharded(module: nn.Module) -> bool:
    return any(is_dtensor(p) for p in module.parameters())


def shard_modules(*roots: nn.Module) -> None:
    """fully_shard every block of every block stack (modules with a `blocks` ModuleList),
    then every direct child holding parameters, then each root."""
    from torch.distributed.fsdp import fully_shard

    for root in roots:
        for m in root.modules():
            blocks = getattr(m, "blocks", None)
            if isinstance(blocks, nn.ModuleList):
                for blk in blocks:
                    fully_shard(blk, reshard_after_forward=True)
        for child in root.children():
            # a block stack (ModuleList) has no forward of its own: its blocks are the units
            if not isinstance(child, nn.ModuleList) and any(True for _ in child.parameters()):
                fully_shard(child, reshard_after_forward=True)
        fully_shard(root, reshard_after_forward=True)


def reshard(*modules: nn.Module) -> None:
    """Free any all-gathered parameters (after a no-grad forward), so all are shards again."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in modules:
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """FSDP: reduce-scatter gradients in this backward (False while accumulating)."""
    if hasattr(module, "set_requires_gradient_sync"):  # an FSDPModule: sets every unit below it
        module.set_requires_gradient_sync(enabled)


def cpu_copy(t: Any) -> Any:
    """A CPU tensor that shares nothing with `t` (full tensor of a DTensor: a collective)."""
    if is_dtensor(t):
        t = t.full_tensor()
    if isinstance(t, torch.Tensor):
        t = t.detach()
        return t.to("cpu", copy=True) if t.device.type == "cpu" else t.to("cpu")
    return t


def _copy_tree(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _copy_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_copy_tree(v) for v in obj)
    return cpu_copy(obj)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with full, CPU, unshared tensors (same keys sharded or not)."""
    return {k: cpu_copy(v) for k, v in module.state_dict().items()}


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors into `module`, whose parameters may be sharded DTensors."""
    current = module.state_dict()
    if not any(is_dtensor(v) for v in current.values()):
        module.load_state_dict(state)
        return
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for k, v in state.items():
        cur = current.get(k)
        if is_dtensor(cur):  # every rank holds the full tensor: each keeps its shard, no traffic
            out[k] = distribute_tensor(v.to(cur.dtype), cur.device_mesh, cur.placements, src_data_rank=None)
        else:
            out[k] = v
    module.load_state_dict(out)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` (indexed by parameter position) with full CPU tensors."""
    return _copy_tree(optimizer.state_dict())


def _params(optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full `state_dict` into an optimizer over (possibly sharded) parameters."""
    params = list(_params(optimizer))
    if not any(is_dtensor(p) for p in params):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.tensor import distribute_tensor

    per_param = {}
    for i, st in state["state"].items():
        p = params[int(i)]
        per_param[i] = {k: distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
                        if isinstance(v, torch.Tensor) and is_dtensor(p) and tuple(v.shape) == tuple(p.shape)
                        else v for k, v in st.items()}
    optimizer.load_state_dict({**state, "state": per_param})
