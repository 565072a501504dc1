"""Distributed pretraining with 2 CPU processes (torchrun, gloo) through run_pretraining.

Why 2 ranks x batch b track 1 rank x batch 2b closely: `batch_size` is the global batch;
the in-memory reader draws the epoch permutation from (seed, epoch) and gives rank r rows
[r*b, (r+1)*b) of each global batch, and masks and crops are drawn for the whole global
batch from (seed, step) and sliced the same way. So both runs see exactly the same images,
crops and masks at every step; the loss is a mean over equally sized per-rank batches and
DDP averages gradients, so the gradient equals the 1-process gradient of the global mean.
Only floating-point summation order differs (per-rank matmuls over 4 rows instead of 8, the
all-reduce sum), i.e. ~1e-7 relative per step. Over 16 AdamW steps we allow 1e-4 relative
on every logged loss and 1e-4 relative (L2 norm per tensor) on the final weights; measured:
~1e-7 on losses, ~2e-6 on the predictor weights.
"""
from __future__ import annotations

import pytest
import torch

from ijepa import checkpoint as ckpt
from ijepa.monitor import LossHistory
from ijepa.tracking import RecordingTracker
from ijepa.trainer import NonFiniteLossError, run_pretraining
from conftest import make_shards, tiny_config

pytestmark = pytest.mark.slow

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), n=64, size=16, channels=1)


def test_two_ranks_match_one_rank_with_double_batch(shards, tmp_path):
    cfg = tiny_config(optimisation={"total_steps": 16, "batch_size": 8}, log_every=1, checkpoint_every=8,
                      deterministic=False)
    one = run_pretraining(cfg, shards, tmp_path / "one")
    two = run_pretraining({**cfg, "nproc": 2}, shards, tmp_path / "two")
    assert two["status"] == "finished" and two["world_size"] == 2 and two["local_batch"] == 4
    assert two["batches_per_rank"] == [16, 16] and one["batches_per_rank"] == [16]
    la, lb = LossHistory.read_csv(tmp_path / "one" / "loss.csv"), LossHistory.read_csv(tmp_path / "two" / "loss.csv")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, 17))
    for x, y in zip(la, lb):
        assert abs(x["loss"] - y["loss"]) <= REL_TOL * abs(x["loss"]), (x["step"], x["loss"], y["loss"])
    a = ckpt.load_checkpoint(tmp_path / "one" / "checkpoints" / "ckpt-00000016.pt")
    b = ckpt.load_checkpoint(tmp_path / "two" / "checkpoints" / "ckpt-00000016.pt")
    for part in ("encoder", "predictor", "target_encoder"):
        for k, v in a[part].items():
            rel = float((v - b[part][k]).norm() / v.norm().clamp_min(1e-12))
            assert rel <= REL_TOL, f"{part}.{k}: relative difference {rel}"
    assert (tmp_path / "two" / "encoder" / "encoder.safetensors").is_file()
    assert (tmp_path / "two" / "loss.png").is_file()
    assert len(b["rng_per_rank"]) == 2  # every rank's RNG states are kept

    # DDP resume: drop the final checkpoint, run again -> continues from step 8 on both
    # ranks and ends where the uninterrupted 2-process run ended
    (tmp_path / "two" / "checkpoints" / "ckpt-00000016.pt").unlink()
    again = run_pretraining({**cfg, "nproc": 2}, shards, tmp_path / "two")
    assert again["resumed_from_step"] == 8 and again["batches_per_rank"] == [8, 8]
    c = ckpt.load_checkpoint(tmp_path / "two" / "checkpoints" / "ckpt-00000016.pt")
    for part in ("encoder", "predictor", "target_encoder"):
        for k, v in b[part].items():
            assert torch.equal(v, c[part][k]), f"{part}.{k} differs after a DDP resume"


def test_two_ranks_streaming_get_equal_batches(shards, tmp_path):
    cfg = tiny_config(optimisation={"total_steps": 5, "batch_size": 8}, data={"mode": "stream"}, nproc=2,
                      num_workers=1, checkpoint_every=10, deterministic=False)
    rec = RecordingTracker()
    s = run_pretraining(cfg, shards, tmp_path / "run", tracker=rec)
    assert s["data_mode"] == "stream" and s["batches_per_rank"] == [5, 5]
    # a non-MLflow tracker cannot reach the child processes: the launcher replays the history
    assert [st for st, _ in rec.series("loss")] == [2, 4, 5] and rec.tags["pretrain_status"] == "finished"


def test_child_error_is_surfaced(shards, tmp_path):
    # an absurd learning rate blows the weights up after the first step: every rank sees the
    # same all-reduced non-finite loss and stops; the launcher re-raises the child's error.
    cfg = tiny_config(optimisation={"total_steps": 6, "batch_size": 8, "lr": 1e30, "start_lr": 1e30,
                                    "warmup_steps": 0}, nproc=2, checkpoint_every=1, deterministic=False)
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step \d of 6.*rank 0 of the torchrun job"):
        run_pretraining(cfg, shards, tmp_path / "run")
    assert not (tmp_path / "run" / "encoder").exists()
    assert torch.load(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints"), weights_only=True)["step"] >= 1
