"""I-JEPA (Assran et al., CVPR 2023): predict the target encoder's representations of
masked blocks from a context block.

One step: the target encoder (EMA, no grad) sees the FULL image; its output is layer-normed
over the feature dimension (no affine) and gathered at each target block. The context
encoder sees only the context tokens (positions added before the gather); the narrow
predictor fills in the target positions from a learned mask token plus their positions.
Loss: "l2" (mean squared error, the paper) or "smooth_l1" (Huber with beta 1, the reference
code), in fp32. After the optimiser step the target encoder moves towards the context
encoder: target <- m * target + (1 - m) * encoder, m from the momentum schedule.

With ``nenc > 1`` every context block is encoded (images repeated along the batch) and
predicts every target block, as in the reference code; the loss averages over all pairs.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ijepa.config import ConfigError
from ijepa.fsdp import is_sharded, local, reshard
from ijepa.masks import MaskGenerator, Masks
from ijepa.methods.base import Masker, Method
from ijepa.models import ModelConfig, Predictor, ViTEncoder, count_params, gather_tokens
from ijepa.precision import adapt_for_precision

__all__ = ["IJepa", "ContextPath", "target_tokens", "jepa_loss", "forward_jepa", "ema_update_"]


class ContextPath(nn.Module):
    """Context encoder + predictor: the trained part, wrapped by DDP as one module."""

    def __init__(self, encoder: ViTEncoder, predictor: Predictor):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, images: torch.Tensor, context: torch.Tensor, targets: torch.Tensor,
                context_valid: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, C, H, W]; context [nenc, B, Nc]; targets [M, B, Nt] ->
        predictions [M * nenc * B, Nt, D], ordered (target block, context block, image)."""
        nenc, b, nc = context.shape
        keep = context.reshape(nenc * b, nc)
        valid = None if context_valid is None else context_valid.reshape(nenc * b, nc)
        imgs = images if nenc == 1 else images.repeat(nenc, 1, 1, 1)
        z = self.encoder(imgs, keep=keep, keep_valid=valid)
        tgt = targets if nenc == 1 else targets.repeat(1, nenc, 1)
        return self.predictor(z, keep, tgt, ctx_valid=valid)


def target_tokens(h: torch.Tensor, targets: torch.Tensor, nenc: int = 1) -> torch.Tensor:
    """Target-encoder output h [B, N, D] -> layer_norm (no affine) -> gathered per target
    block, [M * nenc * B, Nt, D] in ContextPath's order."""
    h = F.layer_norm(h, (h.shape[-1],))
    m, b, nt = targets.shape
    idx = targets if nenc == 1 else targets.repeat(1, nenc, 1)
    return gather_tokens(h.repeat(m * nenc, 1, 1), idx.reshape(m * nenc * b, nt))


def jepa_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """"l2": mean squared error (paper); "smooth_l1": Huber with beta 1 (reference code). fp32."""
    pred, target = pred.float(), target.float()
    if kind == "l2":
        return F.mse_loss(pred, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=1.0)
    raise ConfigError(f"loss: unknown loss {kind!r}; choose 'l2' or 'smooth_l1'")


def forward_jepa(context_path: nn.Module, target_encoder: nn.Module, images: torch.Tensor, masks: Masks,
                 loss_kind: str = "l2", autocast: contextlib.AbstractContextManager | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One I-JEPA forward: (loss, raw target-encoder output h [B, N, D])."""
    with autocast if autocast is not None else contextlib.nullcontext():
        with torch.no_grad():
            h = target_encoder(images)
            tgt = target_tokens(h, masks.targets, masks.context.shape[0])
        pred = context_path(images, masks.context, masks.targets, masks.context_valid)
    return jepa_loss(pred, tgt, loss_kind), h


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter. Under
    FSDP both are sharded alike: each rank updates its own shards (no communication)."""
    if is_sharded(target) or is_sharded(online):
        reshard(target, online)
    tp = [local(p) for p in target.parameters()]
    op = [local(p.detach()) for p in online.parameters()]
    if len(tp) != len(op):
        raise RuntimeError("EMA: target and online networks differ in their parameters")
    torch._foreach_mul_(tp, momentum)
    torch._foreach_add_(tp, op, alpha=1.0 - momentum)


class IJepa(Method):
    """Context encoder + narrow predictor trained; EMA target encoder exported."""

    name = "ijepa"
    title = "I-JEPA"

    @classmethod
    def make_masker(cls, cfg: Any, model: ModelConfig) -> Masker:
        try:
            return MaskGenerator(cfg.masks, model.encoder.grid)
        except ConfigError as err:
            raise ConfigError(f"masks: {err}") from None

    def __init__(self, cfg: Any, model: ModelConfig, masker: Masker, device: torch.device):
        super().__init__(cfg, model, masker, device)
        enc = model.encoder
        self.encoder = ViTEncoder(enc).to(device)
        self.predictor = Predictor(enc, model.predictor).to(device)
        self.target_encoder = ViTEncoder(enc).to(device)
        self.target_encoder.load_state_dict(self.encoder.state_dict())
        self.target_encoder.requires_grad_(False).eval()  # never trained: EMA only
        for module in (self.encoder, self.predictor, self.target_encoder):
            adapt_for_precision(module, cfg.precision, device)
        self.trained = ContextPath(self.encoder, self.predictor)
        self.target_forward: nn.Module = self.target_encoder

    def loss(self, module: nn.Module, images: torch.Tensor, masks: Masks,
             autocast: contextlib.AbstractContextManager) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_jepa(module, self.target_forward, images, masks, self.cfg.loss, autocast)

    def after_step(self, momentum: float) -> None:
        ema_update_(self.target_encoder, self.encoder, momentum)

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "predictor": self.predictor, "target_encoder": self.target_encoder}

    def export_encoder(self) -> ViTEncoder:
        return self.target_encoder

    def compile(self, backend: str = "inductor") -> None:
        self.target_forward = torch.compile(self.target_encoder, backend=backend)

    def derived(self) -> dict[str, Any]:
        return {"encoder_params": count_params(self.encoder), "predictor_params": count_params(self.predictor)}
