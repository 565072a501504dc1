"""The one resume policy: when a run folder's checkpoint may be continued, and what to do
when it may not.

A checkpoint is resumable when its config equals the current one up to `RESUME_SAFE_FIELDS`
and it was made on the same shards (manifest sha256), the same data mode, world size,
steps per epoch and total steps. The trainer refuses anything else
(`ResumeMismatchError`, listing every difference); a pipeline stage that owns its run
folder (DVC keeps the checkpoint folder across runs so that a killed run resumes) calls
`retire_stale_checkpoints` first, so a parameter or data change starts a new run instead.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

from ijepa import checkpoint as ckpt
from ijepa.config import ConfigError, as_dict
from ijepa.methods import METHODS
from ijepa.tracking import NullTracker, Tracker
from ijepa.train_config import RESUME_SAFE_FIELDS, MonitorConfig, PretrainConfig

__all__ = ["ResumeMismatchError", "config_differences", "resume_problems", "retire_stale_checkpoints"]

log = logging.getLogger(__name__)


class ResumeMismatchError(ConfigError):
    """The run folder holds a checkpoint made with a config that the current one contradicts."""


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _normalised(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping with the method's options filled in with their defaults, so that
    ``{}`` and the explicit defaults compare equal. Checkpoints from before `method`
    existed are I-JEPA; before `method_options`, MAE's options lived in a section `mae`; before
    `monitor` and `export`, no probes ran along training and the last step was exported."""
    out = dict(cfg)
    out.setdefault("monitor", as_dict(MonitorConfig()))
    out.setdefault("export", "last")
    method = out.setdefault("method", "ijepa")
    legacy = out.pop("mae", None)
    raw = out.get("method_options") or (legacy if method == "mae" and legacy else {})
    cls = METHODS.get(method)
    try:
        opts = cls.options(raw) if cls is not None else raw
    except ConfigError:
        opts = raw  # reported as a difference, not as a crash
    out["method_options"] = as_dict(opts) if opts is not None and not isinstance(opts, Mapping) else dict(opts or {})
    return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Fields (dotted) whose values differ, ignoring RESUME_SAFE_FIELDS."""
    a, b = _flat(_normalised(saved)), _flat(_normalised(current))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_SAFE_FIELDS:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: checkpoint has {a.get(key, '<absent>')!r}, config has {b.get(key, '<absent>')!r}")
    return diffs


def resume_problems(state: Mapping[str, Any], cfg: PretrainConfig, manifest_sha256: str, manifest_path: Path,
                    run: Mapping[str, Any]) -> list[str]:
    """Why `state` cannot be resumed by this run (empty: it can). `run` holds this run's
    data mode, world size, steps per epoch and total steps."""
    saved_cfg = state.get("config", {})
    problems = config_differences(saved_cfg, cfg.to_dict())
    if run["mode"] == "stream" and saved_cfg.get("num_workers") != cfg.num_workers:
        # the streamed order interleaves the workers' streams: another count, another order
        problems.append(f"num_workers: checkpoint has {saved_cfg.get('num_workers')!r}, config has "
                        f"{cfg.num_workers!r} (the streaming data order depends on it)")
    if state.get("manifest_sha256") != manifest_sha256:
        problems.append(f"shard manifest sha256: checkpoint has {state.get('manifest_sha256')}, "
                        f"{manifest_path} has {manifest_sha256} (different data)")
    data = state.get("data", {})
    for key in ("steps_per_epoch", "world_size", "mode"):
        if data.get(key) != run[key]:
            problems.append(f"data.{key}: checkpoint has {data.get(key)!r}, this run has {run[key]!r}")
    if int(state.get("total_steps", -1)) != run["total_steps"]:
        problems.append(f"total_steps: checkpoint has {state.get('total_steps')}, this run has {run['total_steps']}")
    return problems


def retire_stale_checkpoints(cfg: PretrainConfig, manifest_sha256: str, out_dir: str | Path,
                             tracker: Tracker | None = None) -> list[str]:
    """Delete the checkpoints in ``out_dir/checkpoints`` that `cfg` cannot resume (other
    parameters or other shards, or an unreadable checkpoint), so training starts over.
    Returns the reasons (empty when the checkpoints are resumable or absent); the tracker
    gets them as the tag ``retired_checkpoints``."""
    ckpt_dir = Path(out_dir) / ckpt.CHECKPOINT_SUBDIR
    try:
        found = ckpt.load_latest(ckpt_dir)
    except ckpt.CheckpointError as err:
        found, reasons = None, [str(err)]
    else:
        reasons = []
    if found is not None:
        _, state = found
        reasons = config_differences(state.get("config", {}), cfg.to_dict())
        if state.get("manifest_sha256") != manifest_sha256:
            reasons.append(f"shards changed: checkpoint manifest {state.get('manifest_sha256')}, now {manifest_sha256}")
    if reasons:
        log.warning("starting pretraining from scratch; removing %s: %s", ckpt_dir, "; ".join(reasons))
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        (tracker or NullTracker()).set_tag("retired_checkpoints", "; ".join(reasons)[:5000])
    return reasons
