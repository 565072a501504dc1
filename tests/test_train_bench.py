"""The train-step benchmark runs and reports what it promises (tiny settings), and times the
trainer a user runs: ours is `Trainer.train_step`, the naive step the same trainer with the
hand-written pieces swapped in."""
from __future__ import annotations

import pytest
import torch

from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_train_step")


def test_bench_train_step_smoke(bench):
    out = bench.run(img_size=16, in_chans=3, patch_size=4, batch_size=4, steps=1, warmup=0, min_keep=2,
                    matmul_n=256)
    for key in ("ours_img_s", "naive_img_s", "ratio", "model_gflop_s", "matmul_gflop_s", "flop_fraction",
                "peak_mem_mb"):
        assert out[key] > 0, key
    assert out["gflop_per_step"] > 0 and out["ours_bf16_img_s"] > 0 and out["ours_fp32_img_s"] > 0
    assert out["precision"] in ("fp32", "bf16") and out["ratio_same_precision"] > 0
    assert out["matmul_bf16_gflop_s"] > 0 and out["flop_fraction_own_precision"] > 0


def test_naive_step_is_the_same_trainer_with_loop_pieces(bench, tmp_path):
    from ijepa.train_data import load_train_images, read_shard_info
    from ijepa.trainer import Trainer

    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    info = read_shard_info(bench.write_bench_shards(tmp_path / "shards", images, per_shard=5), verify=True)
    assert torch.equal(load_train_images(info), images)  # the data reader reads the bench's images back
    q = bench.QUICK
    cfg = bench.bench_config("tiny", 4, 8, "fp32", "cpu", {"min_keep": 2}, 0, q["encoder_overrides"],
                             q["predictor_overrides"])
    ours = bench.build_trainer(cfg, info, tmp_path / "ours")
    naive = bench.make_naive_(bench.build_trainer(cfg, info, tmp_path / "naive"))
    assert isinstance(ours, Trainer) and type(naive.method) is type(ours.method)
    for key, module in ours.method.checkpoint_modules().items():  # same models, same initial weights
        theirs = naive.method.checkpoint_modules()[key].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in module.state_dict().items()), key
    assert any(isinstance(m, bench.NaiveAttention) for m in naive.method.trained.modules())
    assert not any(isinstance(m, bench.NaiveAttention) for m in ours.method.trained.modules())
    assert naive.optimizer.defaults["foreach"] is False and naive.optimizer is not ours.optimizer
    # the hand-written attention computes what the fused one does
    x = images.float() / 255
    m = ours.masks_for(0)
    with torch.no_grad():
        a = ours.method.trained(x, m.context, m.targets, m.context_valid)
        b = naive.method.trained(x, m.context, m.targets, m.context_valid)
    assert torch.allclose(a, b, atol=1e-5)
    raw = next(iter(ours.reader.batches(0)))
    for step in (bench.TimedStep(ours, raw), bench.TimedStep(naive, raw, naive=True)):
        assert torch.isfinite(torch.as_tensor(step())) and step.trainer.step == 1
