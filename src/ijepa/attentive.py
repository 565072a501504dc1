"""Attentive probe on frozen patch tokens: the JEPA family's evaluation beyond the linear probe.

A linear head on average-pooled features cannot use *where* a feature is; the attentive probe
(V-JEPA's `AttentiveClassifier`, also used to evaluate I-JEPA encoders) lets learned query
token(s) cross-attend to every patch token of the frozen encoder's last layer::

    a_h   = softmax_t( q_h . k_h(x_t) / sqrt(d_h) )        multi-head cross-attention, Q queries
    z     = query + proj( concat_h  sum_t a_h,t v_h(x_t) )  residual onto the query token
    z     = z + MLP(LayerNorm(z))                            optional (mlp_ratio 0: none)
    logit = head(mean over queries of z)

**Computed without projecting the tokens.** The queries are learned, not functions of the
tokens, so for each query and head the keys enter
only through q_h . (W_k x_t) = (W_k^T q_h) . x_t and the values only through
W_v (sum_t a_t x_t) + b_v (the weights sum to 1; a key bias would add the same q.b to every
token and cancel in the softmax, so the key map has none). `AttentiveProbe.forward` evaluates
exactly that: a [T, D_in] x [D_in, heads*queries] product and a weighted sum of the tokens per
head, instead of projecting all T tokens to keys and values; on CPU the probe costs
O(T * D_in * heads) per image instead of O(T * D_in * width). `forward_reference` is the
textbook computation (scaled_dot_product_attention on projected keys/values); the tests check
both agree.

Tokens are standardised per dimension with train statistics (as the linear probe's BatchNorm
without affine), folded into the same two products: (x - m) / s enters the logits as
x . (u / s) (the m term is the same for every token and cancels in the softmax) and the values
as (sum_t a_t x_t - m) / s, so no per-token arithmetic remains. `fit_attentive_probe` trains
with AdamW (linear warmup, cosine decay) on cached tokens; where `precision` resolves to bf16
(`ijepa.precision`: CPUs with native bf16) the two token products run in bf16 on the tokens as
cached (bf16), the rest of the probe in fp32; it evaluates val top-1 after every epoch and
keeps the weights of the best epoch (ties: the earlier); test top-1 is read with those.
`fit_attentive_probes` trains the probes of several labels on the same tokens at once:
independent weights, losses and epoch choices, one pass over the tokens for all of them
(`joint_logits`), which is where a CPU spends a probe's time.

The raw-pixel baseline reads `pixel_patch_tokens`: the image cut into the encoder's patches,
each patch's pixels one token, with a fixed 2-D sin-cos code of its grid position appended
(`with_position_code`), so "where" is available to the probe as it is to the encoders' tokens.
"""
from __future__ import annotations

import copy
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_

from ijepa.config import require
from ijepa.linear import accuracy
from ijepa.models import _sincos
from ijepa.precision import resolve_precision

__all__ = ["AttentiveConfig", "AttentiveProbe", "AttentiveResult", "fit_attentive_probe", "fit_attentive_probes",
           "joint_logits", "pixel_patch_tokens", "position_code", "with_position_code"]

log = logging.getLogger(__name__)

_EVAL_BATCH = 1024
# Query N(0, 1), weights N(0, 1/fan_in): unit-scale activations from the start. With weights of
# std 0.02 (V-JEPA's init; at width 16) the query-key products start near zero, attention stays
# uniform (mean pooling) for epochs, and a short probe learns less: on the position task of the
# tests, 12 epochs, test top-1 0.47 against 0.79 at lr 3e-3, 0.89 against 0.93 at 1e-2 (no MLP).
INIT_STD = 1.0
# Probes are initialised from torch's global generator, seeded per probe; fits running side by
# side (ijepa.probe_fits) take turns so that no other fit draws from it in between.
_INIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class AttentiveConfig:
    """Attentive probe parameters (conf/base/parameters_probe.yml, key `probe.*.attentive`)."""

    width: int | None = None        # probe width (queries, values); null: the encoder's token width
    heads: int = 4                  # attention heads (must divide the width)
    queries: int = 1                # learned query tokens (their outputs averaged before the head)
    mlp_ratio: float = 1.0          # residual MLP after the cross-attention (hidden = ratio * width); 0: none
    epochs: int = 10                # AdamW epochs; the best on val top-1 is kept
    warmup_epochs: int = 1          # linear learning-rate warmup, then cosine decay to 0
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.05
    position_dim: int = 32          # raw-pixel tokens: sin-cos grid position code appended (multiple of 4)

    def validate(self) -> None:
        require(self.width is None or self.width >= 1, f"attentive.width must be >= 1 or null, got {self.width}")
        require(self.heads >= 1, f"attentive.heads must be >= 1, got {self.heads}")
        require(self.width is None or self.width % self.heads == 0,
                f"attentive.width {self.width} is not divisible by attentive.heads {self.heads}")
        require(self.queries >= 1, f"attentive.queries must be >= 1, got {self.queries}")
        require(math.isfinite(self.mlp_ratio) and self.mlp_ratio >= 0,
                f"attentive.mlp_ratio must be finite and >= 0, got {self.mlp_ratio}")
        require(self.epochs >= 1, f"attentive.epochs must be >= 1, got {self.epochs}")
        require(0 <= self.warmup_epochs < self.epochs,
                f"attentive.warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        require(self.batch_size >= 1, f"attentive.batch_size must be >= 1, got {self.batch_size}")
        require(math.isfinite(self.lr) and self.lr > 0, f"attentive.lr must be positive, got {self.lr}")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                f"attentive.weight_decay must be finite and >= 0, got {self.weight_decay}")
        require(self.position_dim >= 4 and self.position_dim % 4 == 0,
                f"attentive.position_dim must be a positive multiple of 4, got {self.position_dim}")

    def width_for(self, token_dim: int) -> int:
        """The probe width for an encoder of `token_dim`; checks the heads divide it."""
        width = self.width or token_dim
        require(width % self.heads == 0, f"attentive.width {width} (null: the encoder's token width) is not "
                                         f"divisible by attentive.heads {self.heads}")
        return width


class AttentiveProbe(nn.Module):
    """Learned queries cross-attend to tokens [B, T, in_dim] -> logits [B, n_classes] (module docstring)."""

    def __init__(self, in_dim: int, n_classes: int, width: int, heads: int = 4, queries: int = 1,
                 mlp_ratio: float = 4.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.in_dim, self.width, self.heads, self.head_dim = in_dim, width, heads, width // heads
        # input standardisation (train statistics, `set_input_stats`), folded into the attention
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_scale", torch.ones(in_dim))
        self.query = nn.Parameter(torch.zeros(1, queries, width))
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(in_dim, width, bias=False)   # a key bias cancels in the softmax
        self.v = nn.Linear(in_dim, width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width) if mlp_ratio > 0 else None
        self.mlp = Mlp(width, int(width * mlp_ratio)) if mlp_ratio > 0 else None
        self.head = nn.Linear(width, n_classes)
        trunc_normal_(self.query, std=INIT_STD)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=INIT_STD * m.in_features ** -0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_input_stats(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        self.in_mean.copy_(mean)
        self.in_scale.copy_(scale)

    def _queries(self) -> torch.Tensor:
        """Scaled query vectors per head [H, Q, d_h]."""
        q = self.q(self.query)[0]                                   # [Q, W]
        return q.view(q.shape[0], self.heads, self.head_dim).transpose(0, 1) * self.head_dim ** -0.5

    def _finish(self, attended: torch.Tensor) -> torch.Tensor:
        """attended [B, Q, W] (concatenated heads, before proj) -> logits."""
        z = self.query + self.proj(attended)
        if self.mlp is not None:
            z = z + self.mlp(self.norm(z))
        return self.head(z.mean(dim=1))

    def token_queries(self) -> torch.Tensor:
        """[H*Q, in_dim]: what the logits read from each raw token, u = W_k^T q / scale per head."""
        q = self._queries()                                         # [H, Q, dh]
        wk = self.k.weight.view(self.heads, self.head_dim, self.in_dim)
        return torch.einsum("hqd,hdi->hqi", q, wk).reshape(-1, self.in_dim) / self.in_scale

    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, H*Q, in_dim] (attention-weighted sums of the raw tokens) -> logits."""
        b, nq = pooled.shape[0], self.query.shape[1]
        pooled = (pooled.float() - self.in_mean) / self.in_scale
        wv = self.v.weight.view(self.heads, self.head_dim, self.in_dim)
        values = torch.einsum("bhqi,hdi->bqhd", pooled.view(b, self.heads, nq, self.in_dim), wv)
        return self._finish(values.reshape(b, nq, self.width) + self.v.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return joint_logits([self], tokens)[0]

    def forward_reference(self, tokens: torch.Tensor) -> torch.Tensor:
        """The textbook cross-attention (keys and values of every standardised token); equals `forward`."""
        tokens = (tokens.float() - self.in_mean) / self.in_scale
        b, t, _ = tokens.shape
        q = self._queries() * self.head_dim ** 0.5                  # sdpa scales itself
        k = self.k(tokens).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(tokens).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.unsqueeze(0).expand(b, -1, -1, -1), k, v)
        return self._finish(out.transpose(1, 2).reshape(b, -1, self.width))


def joint_logits(probes: Sequence[AttentiveProbe], tokens: torch.Tensor) -> list[torch.Tensor]:
    """Logits of every probe in `probes` on the same tokens [B, T, D], with one pass of the two
    token products for all of them (their query vectors side by side): probes of several labels
    on one model's tokens cost little more than one. The products run in the tokens' dtype."""
    b, t, d = tokens.shape
    us = [p.token_queries() for p in probes]
    logits = F.linear(tokens.reshape(b * t, d), torch.cat(us).to(tokens.dtype)).view(b, t, -1)
    attn = logits.float().softmax(dim=1).transpose(1, 2)            # [B, sum H*Q, T]
    pooled = torch.bmm(attn.to(tokens.dtype), tokens)                # [B, sum H*Q, D]
    return [p.from_pooled(part) for p, part in zip(probes, pooled.split([u.shape[0] for u in us], dim=1))]


@dataclass
class AttentiveResult:
    """A fitted probe (weights of the chosen epoch) and how it was chosen."""

    probe: AttentiveProbe
    epoch: int                                   # 1-based epoch whose weights were kept
    val_top1: list[float] = field(default_factory=list)   # after every epoch
    seconds: float = 0.0
    precision: str = "fp32"                      # resolved: "bf16" (token products in bf16) or "fp32"
    trained_with: list[str] = field(default_factory=list)  # the labels trained in the same passes

    @torch.no_grad()
    def predict(self, tokens: torch.Tensor) -> torch.Tensor:
        return _predict([self.probe], tokens, self.precision)[0]

    def top1(self, tokens: torch.Tensor, y: torch.Tensor) -> float:
        return accuracy(self.predict(tokens), y.long())

    def details(self, cfg: AttentiveConfig) -> dict[str, Any]:
        return {"epoch": self.epoch, "val_top1": [round(v, 4) for v in self.val_top1], "lr": cfg.lr,
                "weight_decay": cfg.weight_decay, "width": self.probe.width, "heads": self.probe.heads,
                "queries": self.probe.query.shape[1], "precision": self.precision,
                "trained_with": self.trained_with, "seconds_joint": round(self.seconds, 3)}


def _compute_dtype(tokens: torch.Tensor, precision: str) -> torch.Tensor:
    """bf16: the two token products read bf16 tokens as they are (AttentiveProbe.forward); fp32:
    the tokens in fp32. Everything after the pooling runs in fp32 either way."""
    return tokens if precision == "bf16" and tokens.dtype == torch.bfloat16 else tokens.float()


def _token_stats(tokens: torch.Tensor, max_samples: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std over the train tokens of at most `max_samples` evenly strided
    samples (tens of thousands of tokens: ample for a standardisation, and a small fraction of a
    fit's time)."""
    step = max(1, math.ceil(tokens.shape[0] / max_samples))
    x = tokens[::step].reshape(-1, tokens.shape[-1]).float()
    var, mean = torch.var_mean(x, dim=0, correction=0)
    return mean, torch.sqrt(var + 1e-5)


@torch.no_grad()
def _predict(probes: Sequence[AttentiveProbe], tokens: torch.Tensor, precision: str) -> list[torch.Tensor]:
    for p in probes:
        p.eval()
    out: list[list[torch.Tensor]] = [[] for _ in probes]
    for i in range(0, tokens.shape[0], _EVAL_BATCH):
        for j, logits in enumerate(joint_logits(probes, _compute_dtype(tokens[i:i + _EVAL_BATCH], precision))):
            out[j].append(logits.argmax(dim=1))
    return [torch.cat(o) if o else torch.zeros(0, dtype=torch.long) for o in out]


def fit_attentive_probe(cfg: AttentiveConfig, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                        val_y: torch.Tensor, n_classes: int, *, width: int | None = None, seed: int = 0,
                        precision: str = "fp32") -> AttentiveResult:
    """One attentive probe (see `fit_attentive_probes`)."""
    return fit_attentive_probes(cfg, train_x, val_x, {"y": (train_y, val_y, n_classes)}, width=width, seed=seed,
                                precision=precision)["y"]


def fit_attentive_probes(cfg: AttentiveConfig, train_x: torch.Tensor, val_x: torch.Tensor,
                         labels: Mapping[str, tuple[torch.Tensor, torch.Tensor, int]], *, width: int | None = None,
                         seed: int = 0, precision: str = "fp32") -> dict[str, AttentiveResult]:
    """Train one `AttentiveProbe` per label on the same tokens [N, T, D] (any float dtype):
    `labels` maps a name to (train labels [N], val labels, number of classes). The probes are
    independent (own weights, own loss, own best epoch on val top-1; AdamW is elementwise) and
    share only the batch order and the passes over the tokens (`joint_logits`). `width`: the
    probe width when `cfg.width` is null (default: D). `precision`: fp32, bf16 or auto
    (`ijepa.precision`). Deterministic for fixed inputs, seed and precision."""
    if train_x.ndim != 3 or val_x.ndim != 3 or train_x.shape[1:] != val_x.shape[1:]:
        raise ValueError(f"attentive probe: tokens must be [N, T, D] alike, got {tuple(train_x.shape)} and "
                         f"{tuple(val_x.shape)}")
    for name, (ty, vy, _) in labels.items():
        if train_x.shape[0] == 0 or val_x.shape[0] == 0 or (ty.shape[0], vy.shape[0]) != (train_x.shape[0],
                                                                                           val_x.shape[0]):
            raise ValueError(f"attentive probe {name}: {train_x.shape[0]} train / {val_x.shape[0]} val tokens "
                             f"for {ty.shape[0]} / {vy.shape[0]} labels")
    t0 = time.perf_counter()
    in_dim = train_x.shape[-1]
    width = cfg.width_for(width or in_dim)
    precision = resolve_precision(precision, "cpu")
    names = list(labels)
    ys = [labels[k][0].long() for k in names]
    vys = [labels[k][1].long() for k in names]
    mean, scale = _token_stats(train_x)
    probes = []
    for i, name in enumerate(names):
        with _INIT_LOCK, torch.random.fork_rng(devices=[]):  # the global generator: one fit at a time
            torch.manual_seed(seed + i)
            probes.append(AttentiveProbe(in_dim, labels[name][2], width, cfg.heads, cfg.queries, cfg.mlp_ratio))
        probes[-1].set_input_stats(mean, scale)
    named = [(n, p) for probe in probes for n, p in probe.named_parameters()]
    decay = [p for n, p in named if p.ndim >= 2 and n != "query"]
    rest = [p for n, p in named if not (p.ndim >= 2 and n != "query")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, fused=True)
    n = train_x.shape[0]
    bs = min(cfg.batch_size, n)
    steps = math.ceil(n / bs)
    total, warm = cfg.epochs * steps, cfg.warmup_epochs * steps

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    results = {name: AttentiveResult(p, epoch=0, precision=precision) for name, p in zip(names, probes)}
    best = [(-1.0, None)] * len(names)
    for epoch in range(1, cfg.epochs + 1):
        for p in probes:
            p.train()
        perm = torch.randperm(n, generator=gen)
        with torch.enable_grad():
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                logits = joint_logits(probes, _compute_dtype(train_x[idx], precision))
                loss = sum(F.cross_entropy(z, y[idx]) for z, y in zip(logits, ys))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        for j, (name, pred) in enumerate(zip(names, _predict(probes, val_x, precision))):
            acc = accuracy(pred, vys[j])
            results[name].val_top1.append(acc)
            if acc > best[j][0]:
                best[j] = (acc, copy.deepcopy(probes[j].state_dict()))
                results[name].epoch = epoch
    seconds = time.perf_counter() - t0
    for j, name in enumerate(names):
        probes[j].load_state_dict(best[j][1])
        results[name].seconds = seconds
        results[name].trained_with = names
    return results


def pixel_patch_tokens(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """uint8 images [N, C, H, W] -> uint8 tokens [N, (H/p)*(W/p), p*p*C], row-major over the grid
    (the encoders' token order); each token a patch's pixels (p, p, C)."""
    n, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(n, c, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, patch_size * patch_size * c)


def position_code(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos code [gh*gw, dim] of each grid position, row-major: the encoder's own table."""
    return _sincos(grid, dim)


def with_position_code(tokens: torch.Tensor, grid: tuple[int, int], dim: int) -> torch.Tensor:
    """tokens [N, T, D] -> [N, T, D + dim] in float32 with `position_code` appended to every token."""
    code = position_code(grid, dim)
    if code.shape[0] != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} tokens for a {grid[0]}x{grid[1]} grid")
    return torch.cat([tokens.float(), code.expand(tokens.shape[0], -1, -1)], dim=-1)
