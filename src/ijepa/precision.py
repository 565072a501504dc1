"""Numeric precision of training and feature extraction: fp32, or bf16 autocast.

``precision: auto`` resolves per device:
- CUDA: bf16 autocast (as the reference code);
- CPU: bf16 autocast when the processor multiplies bf16 natively (AVX512-BF16 or AMX tiles),
  where a bf16 matmul runs several times faster than an fp32 one (benchmarks/RESULTS.md, an
  AVX512-BF16 EPYC: 789 vs 202 GFLOP/s, a whole tiny-preset train step 2.1x faster);
  fp32 elsewhere (an earlier run of the same benchmark on an Intel Xeon measured bf16 at
  0.7x of fp32).
The choice depends only on the machine, so a resumed run on the same machine resolves alike.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["cpu_has_native_bf16", "resolve_precision", "autocast_for", "Fp32CoreAttention", "adapt_for_precision"]


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"auto" -> "bf16" or "fp32" for `device` (see the module docstring); others unchanged."""
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16"
    return "bf16" if kind == "cpu" and cpu_has_native_bf16() else "fp32"


def autocast_for(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Fp32CoreAttention(nn.Module):
    """timm's Attention with the softmax(Q K^T) V core computed in fp32 under autocast.

    On CPU, PyTorch's bf16 attention kernels are several times slower than fp32 ones at our
    sizes (measured: a whole bf16 train step of the tiny preset 1.7-3x faster with the core in
    fp32), while the linear layers, where the FLOPs are, gain from bf16. Shares the wrapped
    module's submodules under the same names, so state_dict keys do not change.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            setattr(self, name, getattr(attn, name))
        self.gate = getattr(attn, "gate", None)
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                 dropout_p=self.attn_drop.p if self.training else 0.0,
                                                 is_causal=is_causal)
        out = out.to(q.dtype).transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


def adapt_for_precision(module: nn.Module, precision: str, device: torch.device | str) -> nn.Module:
    """bf16 on CPU: attention cores in fp32 (`Fp32CoreAttention`); otherwise unchanged."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16" and device.type == "cpu":
        for blk in module.modules():
            attn = getattr(blk, "attn", None)
            if attn is not None and hasattr(attn, "qkv") and not isinstance(attn, Fp32CoreAttention):
                blk.attn = Fp32CoreAttention(attn)
    return module
