"""Checkpoint state and resume of `ijepa.trainer.loop.Trainer`.

The state is built on every rank (RNG states are gathered; under FSDP the full tensors are
gathered too: collectives), as CPU copies that share nothing with the live tensors, then
rank 0 hands it to the background `CheckpointWriter`. Model and optimiser states are
keyed as in a single process whatever `distributed` is, so a run resumes under DDP, FSDP or
one process alike (bitwise only under the same settings).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ijepa import checkpoint as ckpt
from ijepa import fsdp
from ijepa.trainer.resume import ResumeMismatchError, resume_problems

__all__ = ["StateMixin"]

log = logging.getLogger("ijepa.trainer")


class StateMixin:
    def _rng_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG states (a collective under DDP: call on all ranks)."""
        mine = ckpt.rng_state()
        if not self.dist.distributed:
            return [mine]
        import torch.distributed as dist

        out: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(out, mine)
        return out

    def state_dict(self, rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The checkpoint: CPU copies (call on every rank: gathers under FSDP and DDP)."""
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        rng = rng if rng is not None else self._rng_states()
        modules = {k: fsdp.full_state_dict(m) for k, m in self.method.checkpoint_modules().items()}
        return {
            "step": self.step, "epoch": epoch, "total_steps": self.total_steps, **modules,
            "optimizer": fsdp.full_optimizer_state(self.optimizer),
            "schedules": self.schedules.state_dict(), "rng": rng[0], "rng_per_rank": rng,
            "data": {"mode": self.data_mode, "epoch": epoch, "batch": batch, "steps_per_epoch": self.steps_per_epoch,
                     "global_batch": self.global_batch, "world_size": self.dist.world_size, "seed": self.cfg.seed},
            "config": self.cfg.to_dict(), "dataset": self.shards.dataset,
            "manifest_sha256": self.shards.manifest_sha256, **self.logbook.state_dict(),
            "probes": self.probes.state_dict(),
        }

    def save_checkpoint(self) -> Path | None:
        """All ranks call this (RNG states, and FSDP shards, are gathered); rank 0 starts the
        background write of a copy and returns the path it is writing."""
        rng = self._rng_states()
        self.saved_step = self.step
        if self.sharded:
            state = self.state_dict(rng)  # collectives: every rank
            if not self.dist.is_main:
                return None
        elif not self.dist.is_main:
            return None
        else:
            state = self.state_dict(rng)
        path = self.writer.submit(state, self.step)
        self.last_checkpoint = path
        return path

    def maybe_resume(self) -> bool:
        if self.dist.is_main:
            ckpt.clean_stale_temps(self.ckpt_dir)
        found = ckpt.load_latest(self.ckpt_dir, map_location="cpu")
        if found is None:
            return False
        path, state = found
        run = {"mode": self.data_mode, "world_size": self.dist.world_size, "steps_per_epoch": self.steps_per_epoch,
               "total_steps": self.total_steps}
        problems = resume_problems(state, self.cfg, self.shards.manifest_sha256, self.shards.root / "manifest.json",
                                   run)
        if problems:
            raise ResumeMismatchError(
                f"cannot resume from {path}: the run folder {self.out_dir} holds a checkpoint of a different "
                f"configuration, so resuming would not continue the same run:\n  " + "\n  ".join(problems) +
                f"\nUse a new output folder, or delete {self.ckpt_dir} to start over.")
        for key, module in self.method.checkpoint_modules().items():
            fsdp.load_full_state_dict(module, state[key])
        fsdp.load_full_optimizer_state(self.optimizer, state["optimizer"])
        self.schedules.load_state_dict(state["schedules"])
        self.step = int(state["step"])
        self.logbook.load_state_dict(state, self.step)
        self.probes.load_state_dict(state.get("probes"), self.step)
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        ckpt.set_rng_state(per_rank[self.dist.rank] if self.dist.rank < len(per_rank) else state["rng"])
        self.resumed_from = self.step
        self.last_checkpoint = path
        self.saved_step = self.step
        if self.schedules.lr.t != self.step:
            raise ckpt.CheckpointError(f"{path}: schedule position {self.schedules.lr.t} != step {self.step}")
        log.info("resumed from %s (step %d of %d)", path, self.step, self.total_steps)
        return True
