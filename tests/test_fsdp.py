"""Memory options for the large presets, on CPU with 2 gloo processes and a tiny model:
``distributed: fsdp`` (torch FSDP2 `fully_shard`) and ``model.grad_checkpointing`` (with
gradient accumulation) against plain DDP.

Both see the same images, crops and masks as DDP; FSDP averages gradients by reduce-scatter
instead of all-reduce, checkpointing recomputes the blocks' activations, accumulation sums two
half-batch gradients: only floating-point summation order differs, so the loss trajectories
and final weights agree to 1e-4 relative (as DDP vs one process, tests/test_ddp.py).
Checkpoints hold full tensors keyed as in one process; a resumed FSDP run ends where the
uninterrupted one ended.
"""
from __future__ import annotations

import pytest
import torch

from ijepa import checkpoint as ckpt
from ijepa.monitor import LossHistory
from conftest import make_shards, tiny_config
from ijepa.trainer import run_pretraining

pytestmark = pytest.mark.slow

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), n=64, size=16, channels=1)


def _compare(dir_a, dir_b, step: int) -> None:
    la, lb = LossHistory.read_csv(dir_a / "loss.csv"), LossHistory.read_csv(dir_b / "loss.csv")
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for x, y in zip(la, lb):
        assert abs(x["loss"] - y["loss"]) <= REL_TOL * abs(x["loss"]), (x["step"], x["loss"], y["loss"])
    a = ckpt.load_checkpoint(dir_a / "checkpoints" / f"ckpt-{step:08d}.pt")
    b = ckpt.load_checkpoint(dir_b / "checkpoints" / f"ckpt-{step:08d}.pt")
    for part in ("encoder", "predictor", "target_encoder"):
        assert a[part].keys() == b[part].keys()
        for k, v in a[part].items():
            assert not getattr(b[part][k], "device_mesh", None)  # plain full tensors, not DTensors
            rel = float((v - b[part][k]).norm() / v.norm().clamp_min(1e-12))
            assert rel <= REL_TOL, f"{part}.{k}: relative difference {rel}"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert v.shape == b["optimizer"]["state"][i][k].shape, (i, k)


def test_fsdp_and_grad_checkpointing_track_ddp_and_resume(shards, tmp_path):
    cfg = tiny_config(optimisation={"total_steps": 8, "batch_size": 8}, log_every=1, checkpoint_every=4, nproc=2,
                      deterministic=False)
    ddp = run_pretraining(cfg, shards, tmp_path / "ddp")
    sharded = run_pretraining({**cfg, "distributed": "fsdp"}, shards, tmp_path / "fsdp")
    assert ddp["distributed"] == "ddp" and sharded["distributed"] == "fsdp"
    assert sharded["batches_per_rank"] == [8, 8] and sharded["status"] == "finished"
    _compare(tmp_path / "ddp", tmp_path / "fsdp", 8)
    # the exported encoder is the full target encoder, loadable as any other
    from ijepa.export import load_encoder

    enc = load_encoder(tmp_path / "fsdp" / "encoder")
    ref = ckpt.load_checkpoint(tmp_path / "fsdp" / "checkpoints" / "ckpt-00000008.pt")["target_encoder"]
    assert all(torch.equal(v, ref[k]) for k, v in enc.state_dict().items() if k in ref)

    # FSDP + activation checkpointing + 2 accumulation passes per step
    opts = {**cfg, "distributed": "fsdp", "model": {**cfg["model"], "grad_checkpointing": True},
            "optimisation": {**cfg["optimisation"], "accum_steps": 2}}
    heavy = run_pretraining(opts, shards, tmp_path / "fsdp_ckpt_accum")
    assert heavy["accum_steps"] == 2 and heavy["micro_batch"] == 2
    _compare(tmp_path / "ddp", tmp_path / "fsdp_ckpt_accum", 8)

    # resume under FSDP from a DDP checkpoint (same full-tensor format): back to DDP's step-4
    # checkpoint, the FSDP run ends where the uninterrupted DDP run ended (one launch covers
    # both the resume and the cross-strategy load)
    (tmp_path / "ddp" / "checkpoints" / "ckpt-00000008.pt").rename(tmp_path / "ddp_final.pt")
    cross = run_pretraining({**cfg, "distributed": "fsdp"}, shards, tmp_path / "ddp")
    assert cross["resumed_from_step"] == 4 and cross["distributed"] == "fsdp" and cross["batches_per_rank"] == [4, 4]
    final = ckpt.load_checkpoint(tmp_path / "ddp_final.pt")
    resumed = ckpt.load_checkpoint(tmp_path / "ddp" / "checkpoints" / "ckpt-00000008.pt")
    for part in ("encoder", "predictor", "target_encoder"):
        for k, v in final[part].items():
            rel = float((v - resumed[part][k]).norm() / v.norm().clamp_min(1e-12))
            assert rel <= REL_TOL, f"{part}.{k} after resuming a DDP checkpoint under FSDP: relative difference {rel}"
