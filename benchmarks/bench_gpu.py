"""GPU train step: bf16 autocast + fused attention (SDPA), model FLOP utilisation against the
device's measured bf16 matmul rate. `run_all.py` calls it only when CUDA is available (the
results table says "not measured" otherwise); ``device="cpu"`` runs the same code for a smoke check.

One step = masks (vectorised generator, pad policy), target encoder on the full image, context
encoder + predictor, L2 loss, backward, fused AdamW, EMA -- the library's pieces
(`ijepa.train`), on random images resident on the device (no data loading). FLOPs as in
bench_train_step (FlopCounterMode: 3x forward of the trained part + 1x target encoder).

    python benchmarks/bench_gpu.py                      # vit_b16, 224 px, batch 64
"""
from __future__ import annotations

import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ijepa.masks import MaskGenerator, make_generator
from ijepa.models import Predictor, ViTEncoder
from ijepa.train import ContextPath, autocast_for, build_optimizer, ema_update_, forward_jepa, load_config
from ijepa.train_config import resolve_model

__all__ = ["run"]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_tflops(dev: torch.device, n: int = 8192, dtype=torch.bfloat16, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    torch.mm(a, b)
    _sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def run(quick: bool = False, device: str = "cuda", preset: str = "vit_b16", img_size: int = 224,
        batch_size: int = 64, steps: int = 10, warmup: int = 3) -> dict:
    if quick:
        preset, img_size, batch_size, steps, warmup = "tiny", 32, 16, 3, 1
    dev = torch.device(device)
    cfg = load_config({"model": {"preset": preset}, "optimisation": {"batch_size": batch_size},
                       "precision": "bf16", "masks": {"context_policy": "pad", "min_keep": 4}})
    mc = resolve_model(cfg, img_size, 3)
    torch.manual_seed(0)
    enc, pred = ViTEncoder(mc.encoder).to(dev), Predictor(mc.encoder, mc.predictor).to(dev)
    target = ViTEncoder(mc.encoder).to(dev)
    target.load_state_dict(enc.state_dict())
    target.requires_grad_(False).eval()
    path = ContextPath(enc, pred)
    opt = build_optimizer(cfg, enc, pred)
    gen = MaskGenerator(cfg.masks, mc.encoder.grid)
    images = torch.rand(batch_size, 3, img_size, img_size, device=dev)
    autocast = autocast_for("bf16", dev)

    def step(t: int) -> None:
        m = gen(batch_size, make_generator(0, t)).to(dev, non_blocking=True)
        loss, _ = forward_jepa(path, target, images, m, "l2", autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update_(target, enc, 0.996)

    for t in range(warmup):
        step(t)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for t in range(steps):
        t0 = time.perf_counter()
        step(warmup + t)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    flops = 0.0
    draws = 4
    for t in range(draws):
        m = gen(batch_size, make_generator(1, t)).to(dev)
        with torch.no_grad(), autocast:
            with FlopCounterMode(display=False) as fc:
                path(images, m.context, m.targets, m.context_valid)
            trained = fc.get_total_flops()
            with FlopCounterMode(display=False) as fc:
                target(images)
            tgt = fc.get_total_flops()
        flops += (3 * trained + tgt) / draws
    mm = matmul_tflops(dev, n=1024 if quick else 8192)
    model = flops / med / 1e12
    return {"measured": True, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "img_s": round(batch_size / med, 1), "step_ms": round(med * 1e3, 2),
            "model_tflop_s": round(model, 3), "matmul_tflop_s": round(mm, 3), "flop_fraction": round(model / mm, 3),
            "peak_mem_mb": round(torch.cuda.max_memory_allocated(dev) / 2 ** 20, 1) if dev.type == "cuda" else None,
            "config": {"preset": preset, "img_size": img_size, "batch_size": batch_size, "precision": "bf16",
                       "attention": "F.scaled_dot_product_attention (fused)", "steps": steps}}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="vit_b16")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    print(json.dumps(run(a.quick, a.device, a.preset, a.img_size, a.batch_size), indent=2))
