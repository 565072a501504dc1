"""Training checkpoints: atomic, last-K rotation, loadable with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors and primitive containers (dict, list, tuple, str,
int, float, bool, None) — no pickled objects — written as
``<run>/checkpoints/ckpt-<step:08d>.pt`` through a temporary file in the same folder that
is fsynced and renamed (`ijepa.atomic`), so a crash or SIGKILL at any moment leaves the
previous checkpoints intact. Older checkpoints beyond `keep_last` are deleted only after a
new one is in place. `save_checkpoint` checks the contents before writing, so a stray
object (a numpy scalar, a dataclass) fails loudly at save time rather than at resume time.

RNG states (torch CPU and CUDA, numpy, python `random`) are captured as tensors by
`rng_state()` and restored by `set_rng_state()`.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ijepa.atomic import atomic_path

__all__ = [
    "CHECKPOINT_SUBDIR", "CheckpointError", "CheckpointWriteError", "checkpoint_path", "list_checkpoints", "latest_checkpoint",
    "save_checkpoint", "load_checkpoint", "load_latest", "clean_stale_temps", "rng_state",
    "set_rng_state", "check_plain",
]

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
FORMAT = "ijepa-pretrain-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, of an unknown format, or holds a non-plain object."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, read-only, ...); the older ones are intact."""


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"ckpt-{int(step):08d}.pt"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in `ckpt_dir`, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def clean_stale_temps(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Remove temporary files left by a save that was killed (``.ckpt-*.tmp``)."""
    d = Path(ckpt_dir)
    removed = []
    if d.is_dir():
        for p in d.glob(".ckpt-*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.Size)


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise CheckpointError unless `obj` holds only tensors and primitive containers."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where}: key {k!r} is a {type(k).__name__}, not str/int")
            check_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN) or isinstance(obj, np.generic):
        raise CheckpointError(f"{where}: {type(obj).__module__}.{type(obj).__name__} cannot be loaded "
                              f"with weights_only=True; store tensors and primitive values only")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(state: dict[str, Any], ckpt_dir: str | os.PathLike, step: int,
                    keep_last: int | None = None) -> Path:
    """Write `state` atomically as ckpt-<step>.pt, then keep only the newest `keep_last`."""
    check_plain(state)
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(d, step)
    try:
        with atomic_path(final) as tmp:
            torch.save({"format": FORMAT, **state}, tmp)
    except (OSError, RuntimeError) as err:  # torch.save wraps some write errors in RuntimeError
        if isinstance(err, CheckpointError):
            raise
        last = latest_checkpoint(d)
        why = os.strerror(err.errno) if getattr(err, "errno", None) else f"{type(err).__name__}: {err}"
        hint = " (the disk is full: free space there or point the run at another folder)" if getattr(
            err, "errno", None) == errno.ENOSPC else ""
        raise CheckpointWriteError(
            f"cannot write checkpoint {final} (step {step}): {why}{hint}. The run stopped here; nothing was "
            f"overwritten, the last good checkpoint is {last if last else 'none'}"
            f"{' and the next run on this folder resumes from it' if last else ''}.") from err
    _fsync_dir(d)
    if keep_last is not None and keep_last > 0:
        for _, old in list_checkpoints(d)[:-keep_last]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
    return final


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint with ``weights_only=True``."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated/corrupted file, or a non-plain object inside
        raise CheckpointError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an I-JEPA pretraining checkpoint "
                              f"(format {state.get('format') if isinstance(state, dict) else type(state)!r})")
    return state


def load_latest(ckpt_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
                ) -> tuple[Path, dict[str, Any]] | None:
    """Newest loadable checkpoint; an unreadable one is skipped (with a warning) for the
    previous one. None when the folder holds no checkpoint."""
    found = list_checkpoints(ckpt_dir)
    errors = []
    for _, path in reversed(found):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as err:
            log.warning("skipping unreadable checkpoint: %s", err)
            errors.append(str(err))
    if errors:
        raise CheckpointError("no loadable checkpoint in " + str(ckpt_dir) + ": " + "; ".join(errors))
    return None


def rng_state() -> dict[str, Any]:
    """Every global RNG state as tensors / ints (weights_only-safe)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": None if py_gauss is None else float(py_gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint holds %d CUDA RNG states for %d devices; not restoring them",
                        len(cuda), torch.cuda.device_count())
