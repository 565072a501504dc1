"""The train-step benchmark runs and reports what it promises (tiny settings)."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def test_bench_train_step_smoke():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.run(img_size=16, in_chans=3, patch_size=4, batch_size=4, steps=1, warmup=0, min_keep=2,
                    matmul_n=256)
    for key in ("ours_img_s", "naive_img_s", "ratio", "model_gflop_s", "matmul_gflop_s", "flop_fraction",
                "peak_mem_mb"):
        assert out[key] > 0, key
    assert out["gflop_per_step"] > 0 and out["ours_bf16_img_s"] > 0 and out["ours_fp32_img_s"] > 0
    assert out["precision"] in ("fp32", "bf16") and out["ratio_same_precision"] > 0
    assert out["matmul_bf16_gflop_s"] > 0 and out["flop_fraction_own_precision"] > 0
