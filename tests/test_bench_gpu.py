"""The GPU benchmark's bookkeeping, on CPU: its FLOP count of a given mask batch against a hand
count, the spec-peak table, the no-GPU path of `make gpu-check`, and a smoke run of its suite."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import BENCHMARKS, ROOT, load_benchmark, make_shards, tiny_config


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_gpu")


def _vit_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> int:
    """One image through `depth` blocks on `tokens` tokens: qkv 3, proj 1 and MLP 2 x mlp_ratio
    matmuls of D x D per token (2 FLOPs per multiply-add), plus Q K^T and attention x V."""
    per_token = 2 * dim * dim * (3 + 1 + 2 * mlp_ratio)
    return depth * (tokens * per_token + 2 * 2 * tokens * tokens * dim)


def test_step_flops_match_a_hand_count(bench, tmp_path):
    from ijepa.trainer import Trainer, prepare

    shards = make_shards(tmp_path / "s", n=16, size=16, channels=1)
    cfg = tiny_config(optimisation={"batch_size": 8, "total_steps": 4},
                      model={"encoder": {"embed_dim": 64, "depth": 2, "num_heads": 4},
                             "predictor": {"embed_dim": 32, "depth": 2, "num_heads": 4}})
    tr = Trainer(prepare(cfg, shards), tmp_path / "run")
    tr.build()
    images = torch.rand(8, 1, 16, 16)
    for step in range(3):
        m = tr.masks_for(step)
        counted = bench.step_flops(tr, images, m)
        enc, pred = tr.plan.model.encoder, tr.plan.model.predictor
        b, n, p, D, d = 8, enc.num_patches, enc.patch_size, enc.embed_dim, pred.embed_dim
        nenc, _, nc = m.context.shape
        npred, _, nt = m.targets.shape
        patch = 2 * n * (enc.in_chans * p * p) * D  # patch embedding of every patch, per image
        target = b * (patch + _vit_flops(n, D, enc.depth))
        context = nenc * b * (patch + _vit_flops(nc, D, enc.depth))
        predictor = nenc * b * 2 * nc * D * d + npred * nenc * b * (
            _vit_flops(nc + nt, d, pred.depth) + 2 * nt * d * D)
        hand = 3 * (context + predictor) + target
        assert counted == pytest.approx(hand, rel=0.02), (step, counted, hand, nc, nt)


def test_spec_peaks_pick_the_right_gpu(bench):
    assert bench.spec_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.spec_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.spec_bf16_tflops("NVIDIA H200") == 989.0
    assert bench.spec_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.spec_bf16_tflops("NVIDIA L4") == 121.0 and bench.spec_bf16_tflops("NVIDIA L40S") == 362.0
    assert bench.spec_bf16_tflops("NVIDIA A10G") is None and bench.spec_bf16_tflops("Some New GPU") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"machine": {"cpu": "x"}}))
    out = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no GPU" in out.stdout
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["gpu"]["measured"] is False and "not measured" in saved["gpu"]["note"]
    assert "not measured" in (tmp_path / "RESULTS.md").read_text()
    # a measured section (from a machine with a GPU) is kept
    saved["gpu"] = {"measured": True, "device": "NVIDIA H100", "runs": [], "matmul_bf16_tflop_s": 700.0}
    (tmp_path / "results.json").write_text(json.dumps(saved))
    assert subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--out-dir", str(tmp_path)],
                          capture_output=True, cwd=ROOT, timeout=300).returncode == 0
    assert json.loads((tmp_path / "results.json").read_text())["gpu"]["device"] == "NVIDIA H100"


def test_suite_smoke_on_cpu(bench):
    out = bench.run_suite("cpu", quick=True, suite=[("vit_b16", 4, False)])
    (r,) = out["runs"]
    assert r["img_s"] > 0 and r["model_tflop_s"] > 0 and r["mfu_matmul"] > 0 and r["mfu_spec"] is None
    assert r["context_policy"] == "truncate" and len(r["context_tokens"]) == r["steps"]
    assert out["spec_bf16_tflops"] is None and out["measured"] is True
