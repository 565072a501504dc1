"""Entry points: one process in-process, or `nproc` processes through torchrun.

    run_pretraining(cfg, shard_dir, out_dir, tracker=None, loss_csv=None, probes_csv=None) -> summary dict
    train(plan, out_dir, ...)                 the same, for an already prepared `TrainPlan`

``nproc == 1`` trains in this process; otherwise the launcher runs
``python -m torch.distributed.run --standalone --nproc_per_node N -m ijepa.pretrain_main``
(see `ijepa.pretrain_main`), checks its exit code and re-raises a child's error as its own type.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any, Mapping

from ijepa import atomic
from ijepa import checkpoint as ckpt
from ijepa.config import ConfigError
from ijepa.distributed import DistInfo, pick_device
from ijepa.monitor import LossHistory
from ijepa.tracking import MlflowTracker, Tracker
from ijepa.tracking_buffer import buffered
from ijepa.train_config import PretrainConfig
from ijepa.trainer.loop import SUMMARY, CheckpointCallback, NonFiniteLossError, Trainer
from ijepa.trainer.plan import TrainPlan, prepare
from ijepa.trainer.probing import METRIC_PREFIX
from ijepa.trainer.process import process_settings
from ijepa.trainer.resume import ResumeMismatchError

__all__ = ["run_pretraining", "train", "train_worker", "torchrun_command", "launch_torchrun"]

log = logging.getLogger("ijepa.trainer")


def train_worker(plan: TrainPlan, out_dir: str | Path, tracker: Tracker | None = None,
                 loss_csv: str | Path | None = None, dist_info: DistInfo | None = None,
                 on_checkpoint: CheckpointCallback | None = None,
                 probes_csv: str | Path | None = None) -> dict[str, Any]:
    """The body of one process: trains, checkpoints and exports (rank 0)."""
    dist_info = dist_info or DistInfo(device=pick_device(0, plan.cfg.device))
    # MLflow through a buffer: an unreachable tracking server never stops or slows training
    with process_settings(plan.cfg, dist_info), buffered(tracker, out_dir) as tracker:
        return Trainer(plan, out_dir, tracker, loss_csv, dist_info, on_checkpoint=on_checkpoint,
                       probes_csv=probes_csv).run()


def train(plan: TrainPlan, out_dir: str | Path, tracker: Tracker | None = None, loss_csv: str | Path | None = None,
          on_checkpoint: CheckpointCallback | None = None, probes_csv: str | Path | None = None) -> dict[str, Any]:
    """Pretrain with `plan` (see `run_pretraining`)."""
    if plan.cfg.nproc == 1:
        return train_worker(plan, out_dir, tracker, loss_csv, on_checkpoint=on_checkpoint, probes_csv=probes_csv)
    if on_checkpoint is not None:
        raise ConfigError(f"nproc: an on_checkpoint callback needs an in-process run (nproc 1), got nproc "
                          f"{plan.cfg.nproc}")
    return launch_torchrun(plan.cfg, plan.shards.root, out_dir, tracker, loss_csv, probes_csv)


def run_pretraining(cfg: PretrainConfig | Mapping[str, Any], shard_dir: str | Path, out_dir: str | Path,
                    tracker: Tracker | None = None, loss_csv: str | Path | None = None,
                    on_checkpoint: CheckpointCallback | None = None,
                    probes_csv: str | Path | None = None) -> dict[str, Any]:
    """Pretrain ``cfg.method`` (I-JEPA by default) on the train split of `shard_dir`; outputs
    in `out_dir`. Everything is validated before any work.

    Resumes automatically from the newest checkpoint in ``out_dir/checkpoints`` (a config
    that contradicts it raises ResumeMismatchError); a finished run only re-exports.
    Returns the run summary (also written to ``out_dir/summary.json``).
    `on_checkpoint(step, encoder)`: see `ijepa.trainer.loop` (in-process runs only, nproc 1).
    `probes_csv`: the probes-along-training history (``monitor``; default ``out_dir/probes.csv``).
    """
    return train(prepare(cfg, shard_dir), out_dir, tracker, loss_csv, on_checkpoint, probes_csv)


_ERRORS: dict[str, type[BaseException]] = {
    "NonFiniteLossError": NonFiniteLossError, "ResumeMismatchError": ResumeMismatchError,
    "ConfigError": ConfigError, "CheckpointError": ckpt.CheckpointError,
    "CheckpointWriteError": ckpt.CheckpointWriteError,
}


def torchrun_command(cfg_path: Path, shard_dir: str | Path, out_dir: str | Path, nproc: int,
                     loss_csv: str | Path | None = None, probes_csv: str | Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ijepa.pretrain_main", "--config", str(cfg_path), "--shards", str(shard_dir), "--out", str(out_dir)]
    if loss_csv is not None:
        cmd += ["--loss-csv", str(loss_csv)]
    if probes_csv is not None:
        cmd += ["--probes-csv", str(probes_csv)]
    return cmd + ["--skip-verify"]  # the launcher verified the shards already


def launch_torchrun(cfg: PretrainConfig, shard_dir: str | Path, out_dir: str | Path, tracker: Tracker | None = None,
                    loss_csv: str | Path | None = None, probes_csv: str | Path | None = None) -> dict[str, Any]:
    """Run `cfg.nproc` processes with torchrun; surface a child's error; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("failure*.json")) + [out / SUMMARY]:
        stale.unlink(missing_ok=True)
    cfg_path = out / "launch_config.json"
    atomic.write_json(cfg_path, cfg.to_dict())
    env = dict(os.environ)
    env.pop("MLFLOW_RUN_ID", None)
    if isinstance(tracker, MlflowTracker):
        env.update(tracker.run_env())
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = torchrun_command(cfg_path, shard_dir, out, cfg.nproc, loss_csv, probes_csv)
    log.info("launching: %s", " ".join(cmd))
    tail: deque[bytes] = deque(maxlen=64)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while True:
        chunk = os.read(fd, 8192)
        if not chunk:
            break
        tail.append(chunk)
        with contextlib.suppress(OSError, ValueError):  # a closed or odd stderr must not kill the run
            sys.stderr.buffer.write(chunk) if hasattr(sys.stderr, "buffer") else sys.stderr.write(
                chunk.decode(errors="replace"))
            sys.stderr.flush()
    rc = proc.wait()
    if rc != 0:
        text = b"".join(tail).decode(errors="replace")[-4000:]
        failures = sorted(out.glob("failure*.json"))
        if failures:
            info = json.loads(failures[0].read_text())
            exc = _ERRORS.get(info.get("type", ""), RuntimeError)
            raise exc(f"{info.get('message')} (rank {info.get('rank')} of the torchrun job, exit code {rc})")
        raise RuntimeError(f"torchrun exited with code {rc}: {' '.join(cmd)}\n--- last output ---\n{text}")
    summary = json.loads((out / SUMMARY).read_text())
    if tracker is not None and not isinstance(tracker, MlflowTracker):
        _replay(tracker, summary, cfg)
    return summary


def _replay(tracker: Tracker, summary: Mapping[str, Any], cfg: PretrainConfig) -> None:
    """Give a non-MLflow tracker what the child processes could not send it."""
    tracker.log_params({**cfg.to_dict()})
    csv_path = Path(summary["loss_csv"])
    if csv_path.exists():
        for row in LossHistory.read_csv(csv_path):
            step = int(row.pop("step"))
            tracker.log_metrics({k: v for k, v in row.items() if math.isfinite(v)}, step)
    probes_csv = summary.get("probes_csv")
    if probes_csv and Path(probes_csv).exists():
        for row in LossHistory.read_csv(probes_csv):
            step = int(row.pop("step"))
            tracker.log_metrics({f"{METRIC_PREFIX}{k}": v for k, v in row.items() if k != "seconds" and math.isfinite(v)},
                                step)
    tracker.set_tag("pretrain_status", summary.get("status", "finished"))
    for key in ("loss_png", "loss_csv"):
        if summary.get(key):
            tracker.log_artifact(summary[key])
