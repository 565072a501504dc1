"""GPU train step, measured honestly: model FLOP utilisation (MFU) of the trainer's own step.

For each of ViT-B/16 and ViT-H/14 at 224 px, eager and compiled (`torch.compile`, the trainer's
``compile`` path with the mask lengths marked dynamic), the run is built as
`ijepa.trainer.run_pretraining` builds it (`prepare` -> `Trainer(plan).build()`, via
bench_train_step's `build_trainer`, on a temporary shard folder of random images) and
`trainer.train_step(step, images=..., masks=...)` is timed: target encoder on the full image,
context encoder + predictor, L2 loss, backward, fused AdamW, EMA, bf16 autocast -- under the
DEFAULT mask policy (``truncate``: no padding tokens), on one batch resident on the device.

FLOPs are those of the timed steps themselves: the masks of step t are drawn (as the
trainer draws them, from (seed, t)) before timing, handed to `train_step`, and the model
FLOPs of each step are counted on THOSE masks (`step_flops`: FlopCounterMode on one forward
of the trained module x 3 for forward + backward, plus the target encoder's forward;
elementwise work not counted; activation recomputation not counted either). MFU is reported
against the GPU's spec dense bf16 peak (`SPEC_BF16_TFLOPS`; unknown GPUs: none) and against a
measured 8192^3 bf16 matmul. Also recorded: peak memory, compile time (first compiled steps
minus steady steps), graphs compiled and recompiles. Each configuration runs only while the
time budget allows (``make gpu-check``: under 5 minutes); what did not fit says so.

    python benchmarks/bench_gpu.py                          # the gpu-check suite on CUDA
    python benchmarks/bench_gpu.py --quick --device cpu     # smoke run of the same code on CPU
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a file or loaded by path: the sibling module below
    sys.path.insert(0, str(HERE))

from bench_train_step import _sig, bench_config, build_trainer, masks_step_flops, write_bench_shards  # noqa: E402

from ijepa.train_data import read_shard_info, to_float  # noqa: E402
from ijepa.trainer.compiling import compile_counters  # noqa: E402

__all__ = ["run", "run_suite", "step_flops", "spec_bf16_tflops", "SPEC_BF16_TFLOPS", "SUITE", "TARGETS"]

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets; the first
# name that occurs in torch.cuda.get_device_name() wins (more specific names first).
SPEC_BF16_TFLOPS: list[tuple[str, float | None]] = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A10G", None), ("A10", 125.0), ("RTX 4090", 165.0), ("A6000", 155.0),
]

# (preset, batch size): ViT-B/16 and ViT-H/14 at 224 px, eager then compiled
SUITE = [("vit_b16", 128, False), ("vit_h14", 64, False), ("vit_b16", 128, True), ("vit_h14", 64, True)]
# MFU against the spec peak that the issue sets for the day a GPU is measured
TARGETS = {("vit_h14", None): 0.45, ("vit_b16", True): 0.40}


def spec_bf16_tflops(device_name: str) -> float | None:
    for key, peak in SPEC_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


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


# Model FLOPs of one step on exactly the masks it trains on (3 x trained forward + target forward).
step_flops = masks_step_flops


def run(preset: str = "vit_b16", batch_size: int = 128, compiled: bool = False, device: str = "cuda",
        img_size: int = 224, steps: int = 10, warmup: int = 3, policy: str = "truncate",
        overrides: dict | None = None) -> dict[str, Any]:
    """One configuration: img/s, model TFLOP/s of the timed steps' own masks, peak memory,
    compile time and counters."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (batch_size, 3, img_size, img_size), dtype=torch.uint8, generator=g)
    cfg = bench_config(preset, None, batch_size, "bf16", device, {"context_policy": policy},
                       encoder_overrides=(overrides or {}).get("encoder"),
                       predictor_overrides=(overrides or {}).get("predictor"))
    cfg["compile"] = compiled
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        shards = read_shard_info(write_bench_shards(Path(tmp) / "shards", raw), verify=True)
        trainer = build_trainer(cfg, shards, Path(tmp) / "run")
        batch = next(iter(trainer.reader.batches(0)))
    dev = trainer.device
    images = to_float(batch.to(dev))
    masks = [trainer.masks_for(t) for t in range(warmup + steps)]  # the steps' own masks, drawn up front
    before = compile_counters()
    _sync(dev)
    t0 = time.perf_counter()
    first = []
    for t in range(warmup):
        s0 = time.perf_counter()
        trainer.train_step(t, images=images, masks=masks[t])
        _sync(dev)
        first.append(time.perf_counter() - s0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for t in range(warmup, warmup + steps):
        s0 = time.perf_counter()
        trainer.train_step(t, images=images, masks=masks[t])
        _sync(dev)
        times.append(time.perf_counter() - s0)
    after = compile_counters()
    med = statistics.median(times)
    flops_cache: dict[tuple, float] = {}
    per_step = []
    for m in masks[warmup:]:
        key = (tuple(m.context.shape), tuple(m.targets.shape))
        if key not in flops_cache:
            flops_cache[key] = step_flops(trainer, images, m)
        per_step.append(flops_cache[key])
    # model FLOP/s of the timed window: its FLOPs over its time (steps differ in mask lengths)
    model = sum(per_step) / sum(times) / 1e12
    enc = trainer.plan.model.encoder
    return {"preset": preset, "compiled": compiled, "batch_size": batch_size, "img_size": img_size,
            "patch_size": enc.patch_size, "context_policy": policy, "steps": steps,
            "img_s": round(batch_size * steps / sum(times), 1), "step_ms": round(med * 1e3, 2),
            "model_tflop_s": _sig(model, 4), "gflop_per_step": _sig(statistics.mean(per_step) / 1e9, 4),
            "context_tokens": [int(m.context.shape[-1]) for m in masks[warmup:]],
            "peak_mem_gb": round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2) if dev.type == "cuda" else None,
            "compile_s": round(sum(first) - warmup * med, 1) if compiled else None,
            "graphs": after["unique_graphs"] - before["unique_graphs"],
            "recompiles": after["recompiles"] - before["recompiles"],
            "warmup_s": round(time.perf_counter() - t0 - sum(times), 1)}


def run_suite(device: str = "cuda", quick: bool = False, budget_s: float = 270.0,
              suite: list[tuple[str, int, bool]] | None = None) -> dict[str, Any]:
    """Every configuration of `suite` that the time budget allows, with MFU against the spec
    peak and the measured matmul. `quick`: a tiny model on small images (smoke run)."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = spec_bf16_tflops(name) if dev.type == "cuda" else None
    mm = matmul_tflops(dev, n=512 if quick else 8192, repeats=3 if quick else 10)
    runs = []
    for preset, batch, compiled in suite or SUITE:
        if time.perf_counter() - t0 > budget_s:
            runs.append({"preset": preset, "compiled": compiled, "batch_size": batch,
                         "skipped": f"not run: the {budget_s:.0f} s budget was spent"})
            continue
        kw: dict[str, Any] = dict(preset=preset, batch_size=batch, compiled=compiled, device=device)
        if quick:
            kw.update(batch_size=4, img_size=64, steps=2, warmup=1,
                      overrides={"encoder": {"embed_dim": 32, "depth": 2, "num_heads": 2},
                                 "predictor": {"embed_dim": 16, "depth": 1, "num_heads": 2}})
        try:
            r = run(**kw)
        except torch.cuda.OutOfMemoryError as err:
            runs.append({"preset": preset, "compiled": compiled, "batch_size": batch,
                         "skipped": f"out of memory: {str(err).splitlines()[0][:200]}"})
            torch.cuda.empty_cache()
            continue
        r["mfu_spec"] = _sig(r["model_tflop_s"] / peak) if peak else None
        r["mfu_matmul"] = _sig(r["model_tflop_s"] / mm)
        runs.append(r)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    targets = []
    for r in runs:
        for (preset, comp), goal in TARGETS.items():
            if r.get("preset") == preset and (comp is None or r.get("compiled") == comp) and "mfu_spec" in r:
                targets.append({"preset": preset, "compiled": r["compiled"], "target_mfu_spec": goal,
                                "mfu_spec": r["mfu_spec"],
                                "met": None if r["mfu_spec"] is None else r["mfu_spec"] >= goal})
    return {"measured": True, "device": name, "spec_bf16_tflops": peak, "matmul_bf16_tflop_s": round(mm, 1),
            "precision": "bf16 autocast", "attention": "F.scaled_dot_product_attention",
            "timed": "Trainer.train_step(step, images=..., masks=...) on one resident batch",
            "flops": "FlopCounterMode on the timed steps' own masks (3 x trained forward + target forward)",
            "torch": torch.__version__, "quick": quick, "runs": runs, "targets": targets,
            "seconds": round(time.perf_counter() - t0, 1)}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, small images")
    ap.add_argument("--budget-s", type=float, default=270.0)
    a = ap.parse_args()
    print(json.dumps(run_suite(a.device, a.quick, a.budget_s), indent=2))
