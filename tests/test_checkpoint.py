"""Checkpoints: weights_only round trip, keep-last-K, atomic saves, RNG states."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ijepa import checkpoint as ckpt


def _state(step: int) -> dict:
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"step": step, "model": lin.state_dict(), "optimizer": opt.state_dict(), "rng": ckpt.rng_state(),
            "config": {"a": [1, 2.5, "x", None, True], "b": {"c": (0.3, 1.0)}}, "history": {"loss": [1.0, 0.5]}}


def test_round_trip_with_weights_only(tmp_path):
    state = _state(7)
    path = ckpt.save_checkpoint(state, tmp_path, step=7)
    assert path.name == "ckpt-00000007.pt"
    raw = torch.load(path, weights_only=True)  # plain torch.load, no allow-listing needed
    assert raw["step"] == 7 and raw["config"] == state["config"]
    back = ckpt.load_checkpoint(path)
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])


@pytest.mark.parametrize("bad", [np.float32(1.0), object(), {1.5: 2}])
def test_non_plain_objects_are_refused_at_save_time(tmp_path, bad):
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint\.extra"):
        ckpt.save_checkpoint({"step": 1, "extra": bad}, tmp_path, step=1)
    assert ckpt.list_checkpoints(tmp_path) == []


def test_keep_last_k(tmp_path):
    for step in (2, 4, 6, 8, 10):
        ckpt.save_checkpoint({"step": step}, tmp_path, step=step, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [8, 10]
    assert ckpt.latest_checkpoint(tmp_path).name == "ckpt-00000010.pt"


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint({"step": 4, "w": torch.ones(3)}, tmp_path, step=4, keep_last=1)
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(ckpt.CheckpointWriteError, match="disk full"):  # names the file and the last good one
        ckpt.save_checkpoint({"step": 8, "w": torch.zeros(3)}, tmp_path, step=8, keep_last=1)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4]  # not pruned, no partial file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000004.pt"]  # temp removed
    path, state = ckpt.load_latest(tmp_path)
    assert state["step"] == 4 and torch.equal(state["w"], torch.ones(3))


def test_killed_save_temp_is_ignored_and_cleaned_and_corrupt_latest_skipped(tmp_path, caplog):
    ckpt.save_checkpoint({"step": 4}, tmp_path, step=4)
    (tmp_path / ".ckpt-00000008.pt.abc123.tmp").write_bytes(b"partial")  # what SIGKILL mid-save leaves
    (tmp_path / "ckpt-00000012.pt").write_bytes(b"not a checkpoint")  # e.g. a corrupted copy
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 12]
    path, state = ckpt.load_latest(tmp_path)
    assert state["step"] == 4 and "skipping unreadable checkpoint" in caplog.text
    assert [p.name for p in ckpt.clean_stale_temps(tmp_path)] == [".ckpt-00000008.pt.abc123.tmp"]
    assert ckpt.load_latest(tmp_path / "nothing-here") is None


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.rand(5), np.random.normal(), random.gauss(0, 1)  # leave a cached gaussian behind
    ckpt.save_checkpoint({"rng": ckpt.rng_state()}, tmp_path, step=1)
    expect = (torch.rand(4), np.random.rand(3), np.random.normal(), random.random(), random.gauss(0, 1))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ckpt.set_rng_state(ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 1))["rng"])
    got = (torch.rand(4), np.random.rand(3), np.random.normal(), random.random(), random.gauss(0, 1))
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1])
    assert got[2:] == expect[2:]
