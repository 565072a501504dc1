"""GPU train step: bf16 autocast + fused attention (SDPA), model FLOP utilisation against the
device's measured bf16 matmul rate. `run_all.py` calls it only when CUDA is available (the
results table says "not measured" otherwise); ``device="cpu"`` runs the same code for a smoke check.

One step is the trainer's own: the run is built as `ijepa.trainer.run_pretraining` builds it
(`prepare` -> `TrainPlan`, `Trainer(plan).build()`, via bench_train_step's `build_trainer`, on
a temporary shard folder of random images) and `trainer.train_step(step, images=...)` is timed
= masks (vectorised generator, pad policy), target encoder on the full image, context encoder
+ predictor, L2 loss, backward, fused AdamW, EMA -- on one batch resident on the device (no
data loading, no crops). FLOPs as in bench_train_step (FlopCounterMode: 3x forward of the
method's trained module + 1x its target encoder).

    python benchmarks/bench_gpu.py                      # vit_b16, 224 px, batch 64
    python benchmarks/bench_gpu.py --quick --device cpu # smoke run of the same code on CPU
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a file or loaded by path: the sibling module below
    sys.path.insert(0, str(HERE))

from bench_train_step import bench_config, build_trainer, step_flops, write_bench_shards  # noqa: E402

from ijepa.train_data import read_shard_info, to_float  # noqa: E402

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
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (batch_size, 3, img_size, img_size), dtype=torch.uint8, generator=g)
    cfg = bench_config(preset, None, batch_size, "bf16", device, {"context_policy": "pad", "min_keep": 4})
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        shards = read_shard_info(write_bench_shards(Path(tmp) / "shards", raw), verify=True)
        trainer = build_trainer(cfg, shards, Path(tmp) / "run")
        batch = next(iter(trainer.reader.batches(0)))  # the data reader's uint8 batch
    dev = trainer.device
    images = to_float(batch.to(dev))

    for t in range(warmup):
        trainer.train_step(t, images=images)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for t in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(warmup + t, images=images)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    flops = step_flops(trainer, images, draws=4)
    mm = matmul_tflops(dev, n=1024 if quick else 8192)
    model = flops / med / 1e12
    enc = trainer.plan.model.encoder
    return {"measured": True, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "img_s": round(batch_size / med, 1), "step_ms": round(med * 1e3, 2),
            "model_tflop_s": round(model, 3), "matmul_tflop_s": round(mm, 3), "flop_fraction": round(model / mm, 3),
            "peak_mem_mb": round(torch.cuda.max_memory_allocated(dev) / 2 ** 20, 1) if dev.type == "cuda" else None,
            "config": {"preset": preset, "img_size": img_size, "batch_size": batch_size, "precision": "bf16",
                       "attention": "F.scaled_dot_product_attention (fused)", "steps": steps,
                       "patch_size": enc.patch_size, "method": trainer.cfg.method,
                       "timed": "Trainer.train_step(step, images=...)"}}


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
