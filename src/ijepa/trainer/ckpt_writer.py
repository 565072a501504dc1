"""Checkpoints written in a background thread, from a copy, so that no rank waits on the disk.

The caller hands over a state whose tensors are CPU copies (`ijepa.fsdp.full_state_dict` /
`cpu_copy`: training may go on changing the live ones); one writer thread saves it with
`ijepa.checkpoint.save_checkpoint` (temp file, fsync, rename, last-K rotation: atomic as
before). Never two at once: `submit` first waits for the previous write. A failed write
(disk full, ...) is re-raised on the training thread at the next `submit` or `wait`, as the
same `CheckpointWriteError`; `wait` at the end of a run (and on every error path) makes sure
the last checkpoint is complete before the process exits.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from ijepa import checkpoint as ckpt

__all__ = ["CheckpointWriter"]

log = logging.getLogger("ijepa.trainer")


class CheckpointWriter:
    def __init__(self, ckpt_dir: Path, keep_last: int, background: bool = True):
        self.ckpt_dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_written: Path | None = None

    def _write(self, state: dict[str, Any], step: int) -> None:
        try:
            self.last_written = ckpt.save_checkpoint(state, self.ckpt_dir, step, self.keep_last)
            log.info("checkpoint %s", self.last_written)
        except BaseException as err:  # handed to the training thread
            self._error = err

    def submit(self, state: dict[str, Any], step: int) -> Path:
        """Start writing `state` (CPU copies only) as the checkpoint of `step`; returns its path."""
        self.wait()
        if not self.background:
            self._write(state, step)
            self._raise()
            return ckpt.checkpoint_path(self.ckpt_dir, step)
        self._thread = threading.Thread(target=self._write, args=(state, step), name=f"ijepa-ckpt-{step}",
                                        daemon=True)
        self._thread.start()
        return ckpt.checkpoint_path(self.ckpt_dir, step)

    def wait(self, raise_errors: bool = True) -> Path | None:
        """Block until the write in flight (if any) is done; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if raise_errors:
            self._raise()
        return self.last_written

    def _raise(self) -> None:
        err, self._error = self._error, None
        if err is not None:
            raise err

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
