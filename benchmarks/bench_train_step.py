"""Pretraining step speed: our train step vs a naive one, model FLOPs, machine matmul speed.

"Ours" is the step a user runs: the bench writes its in-memory uint8 images as a shard folder
(a temporary directory, the data reader's format: tar shards of PNGs + manifest.json), builds
the run exactly as `ijepa.trainer.run_pretraining` does (`prepare` -> `TrainPlan`,
`Trainer(plan).build()`: the method from `ijepa.methods`, its masker, AdamW, schedules,
precision) and times, per step, the trainer's own RandomResizedCrop (`trainer.augment`) on a
uint8 batch from its data reader plus `trainer.train_step(step, images=...)`: masks from
(seed, step), target encoder on the full image, context encoder on the context tokens,
predictor, loss, backward, AdamW, EMA update. Data reading is not what is measured (the batch
is read once, before timing), nor is the trainer's logging (``log_every`` is set beyond the
timed steps: no grad norm / collapse signals). Precision: the trainer's default "auto"
(`ijepa.precision`: bf16 autocast on CPUs with native bf16, else fp32; in bf16 the attention
cores run in fp32, as in training). Also timed: our step in fp32 (and in bf16 where "auto" is
fp32), and the naive step under our precision (`ratio_same_precision`: the code's gain
without the precision's). Default: the `tiny` preset (ViT dim 192, depth 6; predictor
96 x 4), 28x28 grey, patch 4, paper mask values with min_keep 4, batch 64.

The naive step is the SAME trainer (same config, same initial weights, same
`Trainer.train_step`), with these pieces swapped for hand-written ones (`make_naive_`):
  - hand-written attention softmax(Q K^T / sqrt(d)) V instead of fused SDPA,
  - masks sampled per image with Python loops (blocks placed one by one, context built from
    per-image lists, cut to the batch's shortest),
  - RandomResizedCrop per image (crop + F.interpolate in a Python loop),
  - EMA parameter by parameter instead of the batched foreach update,
  - AdamW as torch's CPU default (a loop of per-parameter ops) instead of the fused kernel,
and is timed interleaved with ours (so background load affects both alike).

Machine speed: fp32 and bf16 ``torch.mm`` of two 2048x2048 matrices (2 n^3 FLOPs), timed
between the train steps (median), so they see the same background load as the steps.
`flop_fraction` compares like with like: the model's FLOP/s against the matmul rate of the
precision our step runs in (bf16 against the bf16 matmul, fp32 against fp32);
`flop_fraction_vs_fp32_matmul` is the mixed figure (a bf16 step against the fp32 matmul),
kept only to compare with older records.

FLOPs per step: `torch.utils.flop_counter.FlopCounterMode` on the forward of the method's
trained module (context encoder on the context tokens + predictor) and of its target encoder
(full image), averaged over several mask draws of the method's masker; forward+backward = 3x
forward for the trained part, 1x for the target encoder (no grad). Elementwise work is not
counted. The CPU attention kernel is counted with torch's SDPA formula (`flop_counter`;
FlopCounterMode knows only the CUDA kernels): records before 2026-12-03 left attention out.

    python benchmarks/bench_train_step.py                      # 28x28 grey, patch 4
    python benchmarks/bench_train_step.py --img-size 64 --in-chans 3 --patch-size 8
    python benchmarks/bench_train_step.py --quick              # smoke run (QUICK settings)
"""
from __future__ import annotations

import gc
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ijepa.data.common import encode_image
from ijepa.data.shards import FORMAT_VERSION, MANIFEST, shard_name
from ijepa.hashing import file_sha256
from ijepa.masks import MaskConfig, Masks, make_generator
from ijepa.precision import resolve_precision
from ijepa.train_data import AUG_STREAM, ShardInfo, crop_params, read_shard_info, to_float
from ijepa.trainer import Trainer, prepare
from ijepa.trainer.optim import param_groups

__all__ = ["run", "NaiveAttention", "loop_masks", "loop_crops", "loop_ema", "write_bench_shards", "bench_config",
           "build_trainer", "make_naive_", "TimedStep", "step_flops", "masks_step_flops", "flop_counter"]

# Schedules as in a long run (the timed steps sit in its warm-up); logging and checkpoints
# never fall on a timed step.
BENCH_TOTAL_STEPS, BENCH_WARMUP_STEPS = 10_000, 100
NEVER = 10 ** 9


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


# ---------------------------------------------------------------------- the real trainer
def write_bench_shards(root: str | Path, images: torch.Tensor, per_shard: int = 1000) -> Path:
    """uint8 [N, C, S, S] `images` as the train split of a shard folder in the format the data
    reader (`ijepa.data.reader`, `ijepa.train_data.read_shard_info`) reads and verifies, the
    layout `ijepa.data.shard_dataset` writes: ``train-%06d.tar`` of lossless PNGs + manifest.json
    with image size, channels and per-shard samples / bytes / sha256."""
    import webdataset as wds

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n, c, h, w = images.shape
    if h != w or images.dtype != torch.uint8:
        raise ValueError(f"expected square uint8 images, got {images.dtype} {tuple(images.shape)}")
    arr = images.permute(0, 2, 3, 1).contiguous().numpy()
    shards = []
    for k, lo in enumerate(range(0, n, per_shard)):
        path = root / shard_name("train", k)
        hi = min(n, lo + per_shard)
        with wds.TarWriter(str(path)) as tar:
            for i in range(lo, hi):
                tar.write({"__key__": f"{i:08d}", "png": encode_image(arr[i])})
        shards.append({"name": path.name, "samples": hi - lo, "bytes": path.stat().st_size,
                       "sha256": file_sha256(path)})
    manifest = {"format_version": FORMAT_VERSION, "dataset": "bench_random", "image_size": h, "channels": c,
                "labels": {}, "splits": {"train": {"samples": n, "shards": shards}}}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return root


def bench_config(preset: str, patch_size: int | None, batch_size: int, precision: str, device: str = "cpu",
                 masks: Mapping[str, Any] | None = None, seed: int = 0, encoder_overrides: dict | None = None,
                 predictor_overrides: dict | None = None) -> dict:
    """The pretraining parameters of a benchmarked run (`ijepa.train_config.load_config` checks them)."""
    model: dict[str, Any] = {"preset": preset, "encoder": dict(encoder_overrides or {}),
                             "predictor": dict(predictor_overrides or {})}
    if patch_size is not None:
        model["patch_size"] = patch_size
    return {"method": "ijepa", "model": model, "masks": dict(masks or {}),
            "optimisation": {"batch_size": batch_size, "total_steps": BENCH_TOTAL_STEPS,
                             "warmup_steps": BENCH_WARMUP_STEPS},
            "precision": precision, "device": device, "seed": seed, "data": {"mode": "memory"},
            "log_every": NEVER, "checkpoint_every": NEVER, "progress": False}


def build_trainer(cfg: Mapping[str, Any], shards: str | Path | ShardInfo, out_dir: str | Path) -> Trainer:
    """The run a user gets from `run_pretraining` up to its first step: `prepare` (config,
    shards, model config, masker, all checked) -> `Trainer(plan).build()`, trained modules in
    train mode as in `Trainer.train_loop`. Nothing is written to `out_dir` before `run()`."""
    trainer = Trainer(prepare(cfg, shards), out_dir)
    trainer.build()
    trainer.method.trained.train()
    return trainer


def make_naive_(trainer: Trainer) -> Trainer:
    """Swap the naive pieces into a built I-JEPA trainer, in place: hand-written attention in
    every module of the method, per-image loop masks, per-parameter EMA, torch's unfused
    (for-loop) AdamW over the trainer's own parameter groups. Models, weights, schedules and
    `Trainer.train_step` stay the trainer's; the loop crops are `naive_images`."""
    method, cfg = trainer.method, trainer.cfg
    for module in method.checkpoint_modules().values():
        naive_attention_(module)
    o = cfg.optimisation
    trainer.optimizer = torch.optim.AdamW(param_groups(*method.trained.children()), lr=o.start_lr,
                                          weight_decay=o.weight_decay, betas=o.betas, eps=o.eps, foreach=False)
    grid, batch = trainer.plan.model.encoder.grid, trainer.global_batch

    def masks_for(step: int) -> Masks:
        return loop_masks(cfg.masks, grid, batch, make_generator(cfg.seed, step)).to(trainer.device)

    def after_step(momentum: float) -> None:
        loop_ema(method.target_encoder, method.encoder, momentum)

    trainer.masks_for = masks_for
    method.after_step = after_step
    return trainer


def naive_images(trainer: Trainer, raw: torch.Tensor, step: int) -> torch.Tensor:
    """The trainer's crops of `step` (same boxes as `trainer.augment`), cut and resized per image."""
    x = to_float(raw.to(trainer.device))
    _, _, H, W = x.shape
    a = trainer.cfg.augmentation
    g = make_generator(AUG_STREAM, trainer.cfg.seed, step)
    boxes = crop_params(trainer.global_batch, H, W, a.scale, a.ratio, g)
    return loop_crops(x, boxes)


class TimedStep:
    """One timed train step: crops of a fixed uint8 batch, then `trainer.train_step`."""

    def __init__(self, trainer: Trainer, raw: torch.Tensor, naive: bool = False):
        self.trainer, self.raw, self.naive = trainer, raw, naive
        self.t = 0

    def __call__(self) -> float:
        t = self.t
        self.t += 1
        tr = self.trainer
        images = naive_images(tr, self.raw, t) if self.naive else tr.augment(self.raw, t, tr.device)
        return tr.train_step(t, images=images)["loss"]


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode knows the CUDA attention kernels, not the CPU one: the same formula
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    extra = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        extra[op] = _cpu_sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=extra)


def masks_step_flops(trainer: Trainer, images: torch.Tensor, masks: Masks) -> float:
    """Model FLOPs of one I-JEPA training step on exactly these `masks`: 3 x the forward of the
    trained module (context encoder on the context tokens + predictor; backward = 2 x forward)
    + 1 x the target encoder's forward on the full image."""
    method = trainer.method
    with torch.no_grad(), trainer.autocast:
        with flop_counter() as fc:
            method.trained(images, masks.context, masks.targets, masks.context_valid)
        trained = fc.get_total_flops()
        with flop_counter() as fc:
            method.target_encoder(images)
        target = fc.get_total_flops()
    return float(3 * trained + target)


def step_flops(trainer: Trainer, images: torch.Tensor, draws: int = 8) -> float:
    """`masks_step_flops` averaged over `draws` draws of the trainer's masker."""
    b = images.shape[0]
    return sum(masks_step_flops(trainer, images, trainer.method.masks(b, make_generator(trainer.cfg.seed, 10_000 + t))
                                .to(trainer.device)) for t in range(draws)) / draws


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

    `encoder_overrides` / `predictor_overrides`: fields of the preset's shapes to change (smoke
    runs; the config's ``model.encoder`` / ``model.predictor``)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, in_chans, img_size, img_size), dtype=torch.uint8, generator=g)
    # "ours" runs as the trainer does by default (precision "auto": bf16 autocast on CPUs with
    # native bf16, else fp32); the naive step is fp32 (the headline ratio) and, where "auto" is
    # bf16, also under the same autocast, so the gain of the precision and of the code show apart.
    prec = resolve_precision("auto", torch.device("cpu"))

    def cfg(precision: str) -> dict:
        return bench_config(preset, patch_size, batch_size, precision, "cpu", {"min_keep": min_keep}, seed,
                            encoder_overrides, predictor_overrides)

    # the shard folder is read while the trainers are built (data mode "memory"); after that
    # nothing in the temporary folder is used
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        shards = read_shard_info(write_bench_shards(Path(tmp) / "shards", images), verify=True)

        def trainer(name: str, precision: str) -> Trainer:
            return build_trainer(cfg(precision), shards, Path(tmp) / name)

        ours_tr = trainer("ours", "auto")
        raw = next(iter(ours_tr.reader.batches(0)))  # this rank's uint8 batch from the data reader
        runs = {"ours": TimedStep(ours_tr, raw),
                "naive": TimedStep(make_naive_(trainer("naive", "fp32")), raw, naive=True)}
        if prec != "fp32":
            runs["ours_fp32"] = TimedStep(trainer("ours_fp32", "fp32"), raw)
            runs["naive_same_precision"] = TimedStep(make_naive_(trainer("naive_same", prec)), raw, naive=True)
        else:
            runs["ours_bf16"] = TimedStep(trainer("ours_bf16", "bf16"), raw)
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
    gc.collect()
    peak_scope = f"our {prec} steps only" if _reset_peak_rss() else "whole benchmark process"
    rss_before = _peak_rss_mb("VmRSS")
    ours()
    ours()
    peak = _peak_rss_mb()
    flops = step_flops(ours.trainer, to_float(raw))
    model_gflop_s = flops / med["ours"] / 1e9
    ours_img_s, naive_img_s = batch_size / med["ours"], batch_size / med["naive"]
    plan = ours.trainer.plan
    enc = plan.model.encoder
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
        # like with like: against the matmul rate of the precision our step runs in (its ceiling)
        "flop_fraction": _sig(model_gflop_s / mm_rate[prec]),
        "flop_fraction_own_precision": _sig(model_gflop_s / mm_rate[prec]),
        "matmul_bf16_gflop_s": round(mm_rate["bf16"], 1),
        # mixed (a bf16 step against the fp32 matmul): only to compare with older records
        "flop_fraction_vs_fp32_matmul": _sig(model_gflop_s / mm),
        "peak_mem_mb": round(peak, 1),
        # extras
        "ours_fp32_img_s": round(batch_size / fp32_s, 1),
        "ours_bf16_img_s": round(batch_size / bf16_s, 1),
        "bf16_speedup": round(fp32_s / bf16_s, 2),
        "model_bf16_gflop_s": round(flops / bf16_s / 1e9, 2),
        "gflop_per_step": round(flops / 1e9, 3),
        "step_ms": {k: round(v * 1e3, 1) for k, v in med.items()},
        "config": {"preset": preset, "img_size": img_size, "in_chans": in_chans, "patch_size": enc.patch_size,
                   "grid": list(enc.grid), "batch_size": batch_size, "min_keep": min_keep, "steps": steps,
                   "threads": torch.get_num_threads(), "embed_dim": enc.embed_dim, "depth": enc.depth,
                   "context_policy": plan.cfg.masks.context_policy, "method": plan.cfg.method,
                   "timed": "Trainer.augment + Trainer.train_step(step, images=...)"},
        "rss_before_steps_mb": round(rss_before, 1),
        "peak_mem_note": f"peak RSS (CPU) of the process during {peak_scope}; it includes the libraries and "
                         f"models (rss_before_steps_mb)",
    }


# the smallest settings (`--quick`, run_all's smoke run): 16 px grey, a 2-block width-32 ViT
QUICK = dict(img_size=16, in_chans=1, patch_size=4, batch_size=8, steps=2, warmup=1, min_keep=2, matmul_n=256,
             encoder_overrides={"embed_dim": 32, "depth": 2, "num_heads": 2},
             predictor_overrides={"embed_dim": 16, "depth": 1, "num_heads": 2})


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
    ap.add_argument("--quick", action="store_true", help="smoke run: the QUICK settings; other flags ignored")
    a = ap.parse_args()
    out = run(**QUICK) if a.quick else run(a.img_size, a.in_chans, a.patch_size, a.batch_size, a.preset, a.steps,
                                            min_keep=a.min_keep)
    print(json.dumps(out, indent=2))
