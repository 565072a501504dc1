"""torch.distributed glue for torchrun: gloo on CPU, nccl on CUDA.

`init_from_env()` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; without them (or with
WORLD_SIZE=1) it returns a single-process `DistInfo` and touches nothing. Only rank 0 logs,
checkpoints and exports (`DistInfo.is_main`).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_from_env", "barrier", "cleanup", "all_reduce_mean", "all_reduce_max",
           "wrap_ddp", "pick_device"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def pick_device(local_rank: int = 0, prefer: str = "auto") -> torch.device:
    """cuda:<local_rank> when CUDA is available (and not `prefer="cpu"`), else cpu."""
    if prefer != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if prefer == "cuda":
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device("cpu")


def init_from_env(prefer_device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(local_rank, prefer_device)
    if world <= 1:
        return DistInfo(0, 1, 0, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return DistInfo(rank, world, local_rank, device, backend)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed:
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks (in place on a copy); identity in a single process."""
    if not info.distributed:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world_size


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.distributed:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def wrap_ddp(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel on `info.device` when distributed, else the module itself."""
    if not info.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    import inspect

    ids = [info.device.index] if info.device.type == "cuda" else None
    # Our buffers (positional tables, normalisation constants) are identical on every rank:
    # no per-forward buffer broadcast.
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(module, device_ids=ids, forward_sync_buffers=False)
    return DDP(module, device_ids=ids, broadcast_buffers=False)
