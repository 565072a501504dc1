"""AdamW and its per-iteration schedules: lr warm-up + cosine, weight decay cosine, EMA
momentum linear (the I-JEPA recipe; all stepped once per iteration)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ijepa.schedules import Cosine, Linear, TrainSchedules, WarmupCosine
from ijepa.train_config import PretrainConfig

__all__ = ["param_groups", "build_optimizer", "build_schedules", "apply_schedules", "grad_norm"]


def param_groups(*modules: nn.Module) -> list[dict[str, Any]]:
    """Two AdamW groups: weights with decay, biases and 1-D params (norms) without."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if name.endswith("bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "name": "decay", "wd_exclude": False},
            {"params": no_decay, "name": "no_decay", "wd_exclude": True, "weight_decay": 0.0}]


def build_optimizer(cfg: PretrainConfig, *modules: nn.Module) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel (one pass over all parameters; CPU and
    CUDA) when this torch build has it for the parameters' device."""
    o = cfg.optimisation
    kwargs = dict(lr=o.start_lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps)
    try:
        return torch.optim.AdamW(param_groups(*modules), fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(param_groups(*modules), **kwargs)


def build_schedules(cfg: PretrainConfig, total_steps: int, steps_per_epoch: int) -> TrainSchedules:
    o = cfg.optimisation
    warmup = o.warmup_steps if o.warmup_steps is not None else int(round(o.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, total_steps)
    return TrainSchedules(
        lr=WarmupCosine(o.start_lr, o.lr, o.final_lr, warmup, total_steps),
        weight_decay=Cosine(o.weight_decay, o.final_weight_decay, total_steps),
        momentum=Linear(o.ema_momentum, o.final_ema_momentum, total_steps))


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if not group.get("wd_exclude", False):
            group["weight_decay"] = weight_decay


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients, as a 0-d tensor on their device (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
