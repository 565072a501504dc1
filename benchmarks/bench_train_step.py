"""Pretraining step speed: our train step vs a naive one, model FLOPs, machine matmul speed.

One train step = masks for the batch (from (seed, step)), RandomResizedCrop, target encoder
on the full image, context encoder on the context tokens, predictor, loss, backward, AdamW,
EMA update — the library's own pieces (`ijepa.train`), on in-memory uint8 images (no
decoding: data reading is not what is measured), at the trainer's default precision "auto"
(`ijepa.precision`: bf16 autocast on CPUs with native bf16, else fp32; in bf16 the attention
cores run in fp32, as in training). Also timed: our step in fp32 (and in bf16 where "auto"
is fp32), and the naive step under our precision (`ratio_same_precision`: the code's gain
without the precision's). Default: the `tiny` preset (ViT dim 192,
depth 6; predictor 96 x 4), 28x28 grey, patch 4, paper mask values with min_keep 4, batch 64.

The naive step, written here, runs the same models and optimiser with
  - hand-written attention softmax(Q K^T / sqrt(d)) V instead of fused SDPA,
  - masks sampled per image with Python loops (blocks placed one by one, context built from
    per-image lists, cut to the batch's shortest),
  - RandomResizedCrop per image (crop + F.interpolate in a Python loop),
  - EMA parameter by parameter instead of the batched foreach update,
  - AdamW as torch's CPU default (a loop of per-parameter ops) instead of the fused kernel,
and is timed interleaved with ours (so background load affects both alike).

Machine speed: fp32 and bf16 ``torch.mm`` of two 2048x2048 matrices (2 n^3 FLOPs), timed
between the train steps (median), so they see the same background load as the steps.
`flop_fraction` is against the fp32 rate (the issue's yardstick), `flop_fraction_own_precision`
against the rate of the precision our step runs in.

FLOPs per step: `torch.utils.flop_counter.FlopCounterMode` on the forward of the trained
part (context encoder on the context tokens + predictor) and of the target encoder (full
image), averaged over several mask draws; forward+backward = 3x forward for the trained part,
1x for the target encoder (no grad). Elementwise work is not counted.

    python benchmarks/bench_train_step.py                      # 28x28 grey, patch 4
    python benchmarks/bench_train_step.py --img-size 64 --in-chans 3 --patch-size 8
"""
from __future__ import annotations

import json
import math
import resource
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ijepa.masks import MaskConfig, MaskGenerator, Masks, make_generator
from ijepa.models import PRESETS, Predictor, ViTEncoder
from ijepa.precision import adapt_for_precision, autocast_for, resolve_precision
from ijepa.train import (ContextPath, apply_schedules, build_optimizer, build_schedules, ema_update_, forward_jepa,
                         load_config, param_groups)
from ijepa.train_data import Augmenter, crop_params

__all__ = ["run", "NaiveAttention", "loop_masks", "loop_crops"]


# ------------------------------------------------------------------------ naive pieces
class NaiveAttention(nn.Module):
    """Multi-head self-attention written out: softmax(Q K^T / sqrt(d)) V (same weights)."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.qkv, self.proj = fused.qkv, fused.proj
        self.num_heads, self.head_dim = fused.num_heads, fused.head_dim

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        attn = scores.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj(out)


def naive_attention_(module: nn.Module) -> nn.Module:
    for blk in module.modules():
        if hasattr(blk, "attn") and hasattr(blk.attn, "qkv"):
            blk.attn = NaiveAttention(blk.attn)
    return module


def loop_masks(cfg: MaskConfig, grid: tuple[int, int], batch: int, g: torch.Generator) -> Masks:
    """Per-image Python-loop multi-block masks (block sizes shared per batch, like the
    reference collator; inclusive positions; bounded retries)."""
    H, W = grid

    def size(scale, aspect):
        s = scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=g).item()
        a = aspect[0] + (aspect[1] - aspect[0]) * torch.rand(1, generator=g).item()
        area = s * H * W
        return (min(max(int(round(math.sqrt(area * a))), 1), H), min(max(int(round(math.sqrt(area / a))), 1), W))

    ph, pw = size(cfg.pred_scale, cfg.pred_aspect)
    eh, ew = size(cfg.enc_scale, cfg.enc_aspect)
    targets, contexts = [], []
    for _ in range(batch):
        for _ in range(1000):
            blocks, covered = [], set()
            for _ in range(cfg.npred):
                top = int(torch.randint(0, H - ph + 1, (1,), generator=g))
                left = int(torch.randint(0, W - pw + 1, (1,), generator=g))
                idx = [(top + r) * W + left + c for r in range(ph) for c in range(pw)]
                blocks.append(idx)
                covered.update(idx)
            ctxs = []
            for _ in range(cfg.nenc):
                top = int(torch.randint(0, H - eh + 1, (1,), generator=g))
                left = int(torch.randint(0, W - ew + 1, (1,), generator=g))
                ctx = [(top + r) * W + left + c for r in range(eh) for c in range(ew)]
                ctxs.append([i for i in ctx if cfg.allow_overlap or i not in covered])
            if min(len(c) for c in ctxs) >= cfg.min_keep:
                break
        targets.append(blocks)
        contexts.append(ctxs)
    nc = min(len(c) for cs in contexts for c in cs)
    ctx_t = torch.zeros(cfg.nenc, batch, nc, dtype=torch.long)
    tgt_t = torch.zeros(cfg.npred, batch, ph * pw, dtype=torch.long)
    for b in range(batch):
        for k in range(cfg.nenc):
            keep = torch.randperm(len(contexts[b][k]), generator=g)[:nc].sort().values
            ctx_t[k, b] = torch.tensor(contexts[b][k])[keep]
        for m in range(cfg.npred):
            tgt_t[m, b] = torch.tensor(targets[b][m])
    return Masks(context=ctx_t, targets=tgt_t, grid=grid, target_hw=(ph, pw), context_hw=(eh, ew),
                 context_counts=torch.full((cfg.nenc, batch), nc))


def loop_crops(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Per-image crop + bilinear resize back to the input size."""
    _, _, H, W = images.shape
    out = []
    for img, (t, l, h, w) in zip(images, boxes.long().tolist()):
        out.append(F.interpolate(img[None, :, t:t + h, l:l + w], size=(H, W), mode="bilinear", align_corners=False))
    return torch.cat(out)


@torch.no_grad()
def loop_ema(target: nn.Module, online: nn.Module, m: float) -> None:
    for pt, po in zip(target.parameters(), online.parameters()):
        pt.mul_(m).add_((1.0 - m) * po.detach())


# ------------------------------------------------------------------------------ one step
class Step:
    """A full train step (ours, or naive=True), on fixed in-memory uint8 images."""

    def __init__(self, cfg, enc_cfg, pred_cfg, images: torch.Tensor, precision: str, naive: bool, seed: int = 0):
        torch.manual_seed(seed)
        self.cfg, self.naive = cfg, naive
        self.device = torch.device("cpu")
        self.encoder, self.predictor = ViTEncoder(enc_cfg), Predictor(enc_cfg, pred_cfg)
        self.target = ViTEncoder(enc_cfg)
        self.target.load_state_dict(self.encoder.state_dict())
        self.target.requires_grad_(False).eval()
        for mod in (self.encoder, self.predictor, self.target):
            naive_attention_(mod) if naive else adapt_for_precision(mod, precision, self.device)
        self.path = ContextPath(self.encoder, self.predictor)
        if naive:  # torch's default AdamW on CPU: a loop of per-parameter ops
            o = cfg.optimisation
            self.opt = torch.optim.AdamW(param_groups(self.encoder, self.predictor), lr=o.start_lr,
                                         weight_decay=o.weight_decay, betas=o.betas, eps=o.eps, foreach=False)
        else:  # ours: the library's optimiser (fused AdamW)
            self.opt = build_optimizer(cfg, self.encoder, self.predictor)
        self.sched = build_schedules(cfg, 10_000, 100)
        self.grid = enc_cfg.grid
        self.masks = MaskGenerator(cfg.masks, self.grid)
        self.images = images
        self.batch = images.shape[0]
        self.aug = Augmenter(True, cfg.augmentation.scale, cfg.augmentation.ratio, seed, self.batch, 0, 1)
        self.autocast = autocast_for(precision, self.device)
        self.t = 0

    def make_masks(self, t: int) -> Masks:
        g = make_generator(self.cfg.seed, t)
        if self.naive:
            return loop_masks(self.cfg.masks, self.grid, self.batch, g)
        return self.masks(self.batch, g)

    def make_images(self, t: int) -> torch.Tensor:
        if not self.naive:
            return self.aug(self.images, t)
        x = self.images.float() / 255
        _, _, H, W = x.shape
        boxes = crop_params(self.batch, H, W, self.cfg.augmentation.scale, self.cfg.augmentation.ratio,
                            make_generator(1, t))
        return loop_crops(x, boxes)

    def __call__(self) -> float:
        t = self.t
        self.t += 1
        images, masks = self.make_images(t), self.make_masks(t)
        v = self.sched.step()
        loss, _ = forward_jepa(self.path, self.target, images, masks, self.cfg.loss, self.autocast)
        apply_schedules(self.opt, v["lr"], v["weight_decay"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        (loop_ema if self.naive else ema_update_)(self.target, self.encoder, v["momentum"])
        return float(loss.detach())

    def flops_per_step(self, draws: int = 8) -> float:
        """Model FLOPs of one training step (3x forward trained + 1x forward target)."""
        x = self.images.float() / 255
        total = 0.0
        for t in range(draws):
            m = self.masks(self.batch, make_generator(self.cfg.seed, 10_000 + t))
            with torch.no_grad():
                with FlopCounterMode(display=False) as fc:
                    self.path(x, m.context, m.targets, m.context_valid)
                trained = fc.get_total_flops()
                with FlopCounterMode(display=False) as fc:
                    self.target(x)
                target = fc.get_total_flops()
            total += 3 * trained + target
        return total / draws


def matmul_gflops(n: int = 2048, repeats: int = 7) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def _sig(x: float, digits: int = 3) -> float:
    """`x` to `digits` significant figures."""
    return float(f"{x:.{digits}g}")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb(field: str = "VmHWM") -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024


def run(img_size: int = 28, in_chans: int = 1, patch_size: int = 4, batch_size: int = 64, preset: str = "tiny",
        steps: int = 8, warmup: int = 2, min_keep: int = 4, seed: int = 0, matmul_n: int = 2048,
        encoder_overrides: dict | None = None, predictor_overrides: dict | None = None) -> dict:
    """Median images/s of our step (fp32 and bf16) and of the naive step (fp32), side by side.

    `encoder_overrides` / `predictor_overrides`: fields of the preset's shapes to change (smoke runs)."""
    cfg = load_config({"model": {"preset": preset, "patch_size": patch_size}, "masks": {"min_keep": min_keep},
                       "optimisation": {"batch_size": batch_size}, "seed": seed})
    base = PRESETS[preset]
    enc_cfg = replace(base.encoder, img_size=img_size, in_chans=in_chans, patch_size=patch_size,
                      **(encoder_overrides or {}))
    pred_cfg = replace(base.predictor, **(predictor_overrides or {}))
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, in_chans, img_size, img_size), dtype=torch.uint8, generator=g)
    # "ours" runs as the trainer does by default (precision "auto": bf16 autocast on CPUs with
    # native bf16, else fp32); the naive step is fp32 (the headline ratio) and, where "auto" is
    # bf16, also under the same autocast, so the gain of the precision and of the code show apart.
    prec = resolve_precision("auto", torch.device("cpu"))
    runs = {"ours": Step(cfg, enc_cfg, pred_cfg, images, prec, naive=False, seed=seed),
            "naive": Step(cfg, enc_cfg, pred_cfg, images, "fp32", naive=True, seed=seed)}
    if prec != "fp32":
        runs["ours_fp32"] = Step(cfg, enc_cfg, pred_cfg, images, "fp32", naive=False, seed=seed)
        runs["naive_same_precision"] = Step(cfg, enc_cfg, pred_cfg, images, prec, naive=True, seed=seed)
    else:
        runs["ours_bf16"] = Step(cfg, enc_cfg, pred_cfg, images, "bf16", naive=False, seed=seed)
    for step in runs.values():
        for _ in range(warmup):
            step()
    a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
    a16, b16 = a.bfloat16(), b.bfloat16()
    torch.mm(a, b), torch.mm(a16, b16)
    times: dict[str, list[float]] = {k: [] for k in runs}
    mm_times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(steps):  # interleaved, the matmul probes too: background load hits all alike
        for name, step in runs.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
        for kind, (x, y) in (("fp32", (a, b)), ("bf16", (a16, b16))):
            for _ in range(2):
                t0 = time.perf_counter()
                torch.mm(x, y)
                mm_times[kind].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    mm_rate = {k: 2 * matmul_n ** 3 / statistics.median(v) / 1e9 for k, v in mm_times.items()}
    mm = mm_rate["fp32"]
    # peak memory of OUR step alone (process RSS, incl. the ~0.4 GB of loaded libraries):
    # the other runs are dropped and the kernel's peak counter reset first
    ours = runs["ours"]
    fp32_s = med.get("ours_fp32", med["ours"])
    bf16_s = med.get("ours_bf16", med["ours"])
    naive_same_s = med.get("naive_same_precision", med["naive"])
    for name in [k for k in runs if k != "ours"]:
        del runs[name]
    import gc

    gc.collect()
    peak_scope = f"our {prec} steps only" if _reset_peak_rss() else "whole benchmark process"
    rss_before = _peak_rss_mb("VmRSS")
    ours()
    ours()
    peak = _peak_rss_mb()
    flops = ours.flops_per_step()
    model_gflop_s = flops / med["ours"] / 1e9
    ours_img_s, naive_img_s = batch_size / med["ours"], batch_size / med["naive"]
    return {
        "precision": prec,
        "ours_img_s": round(ours_img_s, 1),
        "naive_img_s": round(naive_img_s, 1),
        "ratio": round(ours_img_s / naive_img_s, 2),
        # the same naive code under our precision: what the code alone gains
        "naive_same_precision_img_s": round(batch_size / naive_same_s, 1),
        "ratio_same_precision": round(naive_same_s / med["ours"], 2),
        # significant figures, not decimals: a quick run's tiny model must not round to 0
        "model_gflop_s": _sig(model_gflop_s),
        "matmul_gflop_s": round(mm, 1),
        "flop_fraction": _sig(model_gflop_s / mm),
        # against the matmul rate of the precision our step runs in (its real ceiling)
        "matmul_bf16_gflop_s": round(mm_rate["bf16"], 1),
        "flop_fraction_own_precision": _sig(model_gflop_s / mm_rate[prec]),
        "peak_mem_mb": round(peak, 1),
        # extras
        "ours_fp32_img_s": round(batch_size / fp32_s, 1),
        "ours_bf16_img_s": round(batch_size / bf16_s, 1),
        "bf16_speedup": round(fp32_s / bf16_s, 2),
        "model_bf16_gflop_s": round(flops / bf16_s / 1e9, 2),
        "gflop_per_step": round(flops / 1e9, 3),
        "step_ms": {k: round(v * 1e3, 1) for k, v in med.items()},
        "config": {"preset": preset, "img_size": img_size, "in_chans": in_chans, "patch_size": patch_size,
                   "grid": list(enc_cfg.grid), "batch_size": batch_size, "min_keep": min_keep, "steps": steps,
                   "threads": torch.get_num_threads(), "embed_dim": enc_cfg.embed_dim, "depth": enc_cfg.depth,
                   "context_policy": cfg.masks.context_policy},
        "rss_before_steps_mb": round(rss_before, 1),
        "peak_mem_note": f"peak RSS (CPU) of the process during {peak_scope}; it includes the libraries and "
                         f"models (rss_before_steps_mb)",
    }


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img-size", type=int, default=28)
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--min-keep", type=int, default=4)
    a = ap.parse_args()
    print(json.dumps(run(a.img_size, a.in_chans, a.patch_size, a.batch_size, a.preset, a.steps,
                         min_keep=a.min_keep), indent=2))
