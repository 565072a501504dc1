"""`make gpu-check`: the GPU figures in one command, under 5 minutes on one GPU.

With CUDA: bench_gpu's suite (ViT-B/16 and ViT-H/14 at 224 px, eager and compiled: img/s,
MFU against the spec bf16 peak and a measured matmul, peak memory, compile time, recompiles),
written as the `gpu` section of benchmarks/results.json and RESULTS.md.
Without CUDA: says so and exits 0; the `gpu` section says "not measured" (a measured section
from another machine is kept, never overwritten by a machine that has no GPU).

    python benchmarks/gpu_check.py [--budget-s 270] [--out-dir benchmarks]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def _table(gpu: dict) -> str:
    rows = [f"{gpu['device']}: spec bf16 peak {gpu.get('spec_bf16_tflops') or 'unknown'} TFLOP/s, "
            f"measured bf16 matmul {gpu['matmul_bf16_tflop_s']} TFLOP/s"]
    for r in gpu["runs"]:
        tag = f"{r['preset']} {'compiled' if r['compiled'] else 'eager'} batch {r['batch_size']}"
        if "skipped" in r:
            rows.append(f"  {tag}: {r['skipped']}")
            continue
        rows.append(f"  {tag}: {r['img_s']} img/s, {r['model_tflop_s']} TFLOP/s, MFU spec {r['mfu_spec']}, "
                    f"MFU matmul {r['mfu_matmul']}, peak {r['peak_mem_gb']} GB, compile {r['compile_s']} s, "
                    f"recompiles {r['recompiles']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop starting new configurations after this")
    ap.add_argument("--out-dir", default=str(HERE), help="where results.json and RESULTS.md are")
    a = ap.parse_args(argv)
    import torch

    import run_all

    out_dir = Path(a.out_dir)
    path = out_dir / "results.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if not torch.cuda.is_available():
        print("gpu-check: no GPU here (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}): nothing measured")
        if not (res.get("gpu") or {}).get("measured"):
            res["gpu"] = {"measured": False, "note": "not measured: no CUDA device was available to any session "
                                                     "that ran `make gpu-check`"}
            out_dir.mkdir(parents=True, exist_ok=True)
            run_all.write_results(res, out_dir)
        return 0
    import bench_gpu

    gpu = bench_gpu.run_suite("cuda", budget_s=a.budget_s)
    info = run_all.machine_info()
    gpu["measured_at"] = info["date"]
    res["gpu"] = gpu
    res.setdefault("machine", info)
    run_all.write_results(res, out_dir)
    print(_table(gpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
