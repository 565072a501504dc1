"""Exact resume: a run SIGKILLed mid-training (while writing a checkpoint, with steps done past
the previous one) and resumed ends bitwise equal to an uninterrupted run (CPU, deterministic).

The kill is triggered deterministically: the child replaces torch.save so that the save of
the step-12 checkpoint writes half a file, creates a marker and blocks; the test waits for
the marker (bounded), SIGKILLs the child, then resumes in a fresh process.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ijepa import checkpoint as ckpt
from ijepa.monitor import LossHistory
from conftest import make_shards, tiny_config

CHILD = r"""
import json, signal, sys
import torch
import ijepa.checkpoint
from ijepa.trainer import run_pretraining
cfg, shards, out, marker, kill_at = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
if kill_at:
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == kill_at:
            with open(f, "wb") as fh:
                fh.write(b"half a checkpoint")
            open(marker, "w").write("saving")
            signal.pause()  # blocked mid-save until SIGKILL
        return real_save(obj, f, *args, **kwargs)
    ijepa.checkpoint.torch.save = save
run_pretraining(cfg, shards, out)
"""


def _start(cfg: dict, shards: Path, out: Path, marker: Path, kill_at: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg), str(shards), str(out), str(marker),
                             str(kill_at)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before the marker:\n"
                                 + proc.stdout.read().decode(errors="replace"))
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no marker {path} after {timeout}s")
        time.sleep(0.02)  # polling interval only; correctness does not depend on timing


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode(errors="replace")


def test_sigkill_and_resume_is_bitwise_equal(tmp_path):
    shards = make_shards(tmp_path / "shards", n=48, size=16, channels=3)  # RGB scenes, project writer
    # 14 steps over 3 epochs (16 images x 3 steps), crops on, checkpoints at 4, 8, 12, 14; with
    # workers, the images and masks of the next steps are built in DataLoader workers
    cfg = tiny_config(optimisation={"total_steps": 14, "batch_size": 16, "warmup_steps": 3},
                      checkpoint_every=4, keep_last=2, log_every=3, deterministic=True, threads=1,
                      num_workers=2)  # 0 workers give the same run: tests/test_train_input.py
    ref = _start(cfg, shards, tmp_path / "ref", tmp_path / "unused", 0)
    victim = _start(cfg, shards, tmp_path / "run", tmp_path / "marker", 12)
    _wait_for(tmp_path / "marker", victim)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL

    run_ckpts = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(run_ckpts)] == [4, 8]  # 12 was being written
    assert any(p.name.startswith(".ckpt-00000012") for p in run_ckpts.iterdir())  # its partial temp file
    killed_rows = [int(r["step"]) for r in LossHistory.read_csv(tmp_path / "run" / "loss.csv")]
    # logged past the last complete checkpoint before dying; the step-12 checkpoint is written in
    # the background, so training may also have reached step 14 (and logged it) before the kill
    assert killed_rows in ([3, 6, 9, 12], [3, 6, 9, 12, 14])

    resumed = _start(cfg, shards, tmp_path / "run", tmp_path / "unused", 0)
    _finish(resumed)
    _finish(ref)

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 8 and summary["steps"] == 14
    assert not any(p.name.startswith(".") for p in run_ckpts.iterdir())  # stale temp cleaned
    a = torch.load(tmp_path / "ref" / "checkpoints" / "ckpt-00000014.pt", weights_only=True)
    b = torch.load(run_ckpts / "ckpt-00000014.pt", weights_only=True)
    for part in ("encoder", "predictor", "target_encoder"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), f"optimizer state {i}.{k} differs"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # loss history continues without duplicated or missing steps, with identical values
    ra = LossHistory.read_csv(tmp_path / "ref" / "loss.csv")
    rb = LossHistory.read_csv(tmp_path / "run" / "loss.csv")
    assert [int(r["step"]) for r in rb] == [3, 6, 9, 12, 14]
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k != "img_per_s"} == {k: v for k, v in y.items() if k != "img_per_s"}
    ea = (tmp_path / "ref" / "encoder" / "encoder.safetensors").read_bytes()
    eb = (tmp_path / "run" / "encoder" / "encoder.safetensors").read_bytes()
    assert ea == eb
