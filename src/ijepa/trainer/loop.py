"""The method-agnostic training loop of one process (one rank).

One iteration (`Trainer.train_step`):
  data     next uint8 batch of this rank (ijepa.train_data), RandomResizedCrop seeded by
           (seed, step), float [0, 1]
  masks    the method's masker on the GLOBAL batch with make_generator(seed, step), this rank's rows
  forward  the method's loss (I-JEPA: ijepa.methods.ijepa; MAE: ijepa.methods.mae)
  check    global loss finite, else NonFiniteLossError naming the step (nothing is stepped)
  backward AdamW (no weight decay on biases and 1-D params), lr / wd from the schedules,
           optional grad clipping (off by default)
  after    the method's after_step (I-JEPA: EMA of the target encoder, m from the schedule)
  log      every log_every steps: loss, lr, wd, momentum, images/s, grad norm, collapse signals
  ckpt     every checkpoint_every steps and at the end (rank 0; atomic; last K kept)

Masks and crops are seeded by the global step, the data order by (seed, epoch) and the
position inside the epoch is step % steps_per_epoch, so a resumed run needs only the step:
with deterministic settings on CPU it reproduces an uninterrupted run bit for bit.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from ijepa import atomic
from ijepa import checkpoint as ckpt
from ijepa.config import ConfigError
from ijepa.distributed import DistInfo, all_reduce_mean, barrier, pick_device, wrap_ddp
from ijepa.masks import Masks, derive_seed, make_generator
from ijepa.monitor import collapse_stats
from ijepa.precision import autocast_for, resolve_precision
from ijepa.tracking import NullTracker, Tracker
from ijepa.train_data import Augmenter
from ijepa.train_input import TrainInput
from ijepa.trainer.logbook import Logbook
from ijepa.trainer.optim import apply_schedules, build_optimizer, build_schedules, grad_norm
from ijepa.trainer.plan import TrainPlan
from ijepa.trainer.process import seed_everything
from ijepa.trainer.resume import ResumeMismatchError, resume_problems

__all__ = ["Trainer", "NonFiniteLossError", "CheckpointCallback", "ENCODER_SUBDIR", "SUMMARY"]

log = logging.getLogger("ijepa.trainer")

ENCODER_SUBDIR = "encoder"
SUMMARY = "summary.json"

# Called on rank 0 as on_checkpoint(step, exported encoder) after each checkpoint of the loop
# (e.g. a val probe for Optuna's pruner); it runs under its own RNG fork, so it cannot change
# the training, and an exception it raises (optuna.TrialPruned) ends the run.
CheckpointCallback = Callable[[int, nn.Module], None]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before stepping the optimizer."""


class Trainer:
    """State and steps of one pretraining run in one process (one rank)."""

    def __init__(self, plan: TrainPlan, out_dir: str | Path, tracker: Tracker | None = None,
                 loss_csv: str | Path | None = None, dist_info: DistInfo | None = None,
                 on_checkpoint: CheckpointCallback | None = None):
        self.plan = plan
        self.cfg = plan.cfg
        self.shards = plan.shards
        self.on_checkpoint = on_checkpoint
        self.out_dir = Path(out_dir)
        self.dist = dist_info or DistInfo(device=pick_device(0, self.cfg.device))
        self.tracker: Tracker = tracker if (tracker is not None and self.dist.is_main) else NullTracker()
        self.loss_csv = Path(loss_csv) if loss_csv is not None else self.out_dir / "loss.csv"
        self.ckpt_dir = self.out_dir / ckpt.CHECKPOINT_SUBDIR
        self.device = self.dist.device
        self.step = 0  # completed iterations
        self.logbook = Logbook(self.tracker, self.loss_csv, self.cfg.collapse, self.dist.is_main)
        self.history = self.logbook.history
        self.resumed_from: int | None = None
        self.last_checkpoint: Path | None = None
        self.saved_step: int | None = None
        self.batches_seen = 0
        self._data_iter = None
        self._data_next: int | None = None  # the step the data iterator yields next

    # -- build ---------------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.cfg
        if self.dist.world_size != cfg.nproc:
            raise ConfigError(f"nproc: the config says {cfg.nproc} processes but {self.dist.world_size} were started")
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.method = self.plan.method(cfg, self.plan.model, self.plan.masker, self.device)
        # from here on each rank has its own torch stream (drop_path), rank 0's being the
        # single-process one
        torch.manual_seed(derive_seed(cfg.seed, 303, self.dist.rank))
        self.trained_params = [p for p in self.method.trained.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg, *self.method.trained.children())
        self.global_batch = cfg.optimisation.batch_size
        self.local_batch = self.global_batch // self.dist.world_size
        self.input = TrainInput(cfg, self.shards, self.plan.masker, self.global_batch, self.dist.rank,
                                self.dist.world_size, self.device)  # reader + loader workers (images, masks)
        self.data_mode, self.reader = self.input.mode, self.input.reader
        self.steps_per_epoch = self.reader.steps_per_epoch
        o = cfg.optimisation
        self.total_steps = o.total_steps if o.total_steps is not None else o.epochs * self.steps_per_epoch
        self.schedules = build_schedules(cfg, self.total_steps, self.steps_per_epoch)
        self.augment = Augmenter(cfg.augmentation.enabled, cfg.augmentation.scale, cfg.augmentation.ratio,
                                 cfg.seed, self.global_batch, self.dist.rank, self.dist.world_size)
        self.autocast = autocast_for(cfg.precision, self.device)
        self.train_module: nn.Module = wrap_ddp(self.method.trained, self.dist)
        if cfg.compile:
            self.train_module = torch.compile(self.train_module)
            self.method.compile()

    def derived(self) -> dict[str, Any]:
        return {"img_size": self.shards.image_size, "in_chans": self.shards.channels,
                "grid": list(self.plan.model.encoder.grid), "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch, "global_batch": self.global_batch,
                "local_batch": self.local_batch, "world_size": self.dist.world_size,
                "data_mode": self.data_mode, "precision": resolve_precision(self.cfg.precision, self.device),
                "device": str(self.device), "dataset": self.shards.dataset,
                "manifest_sha256": self.shards.manifest_sha256, "method": self.cfg.method,
                **self.method.derived()}

    # -- checkpoint ----------------------------------------------------------------------
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
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        rng = rng if rng is not None else self._rng_states()
        return {
            "step": self.step, "epoch": epoch, "total_steps": self.total_steps,
            **{k: m.state_dict() for k, m in self.method.checkpoint_modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "schedules": self.schedules.state_dict(), "rng": rng[0], "rng_per_rank": rng,
            "data": {"mode": self.data_mode, "epoch": epoch, "batch": batch, "steps_per_epoch": self.steps_per_epoch,
                     "global_batch": self.global_batch, "world_size": self.dist.world_size, "seed": self.cfg.seed},
            "config": self.cfg.to_dict(), "dataset": self.shards.dataset,
            "manifest_sha256": self.shards.manifest_sha256, **self.logbook.state_dict(),
        }

    def save_checkpoint(self) -> Path | None:
        """All ranks call this (their RNG states are gathered); rank 0 writes."""
        rng = self._rng_states()
        self.saved_step = self.step
        if not self.dist.is_main:
            return None
        path = ckpt.save_checkpoint(self.state_dict(rng), self.ckpt_dir, self.step, self.cfg.keep_last)
        self.last_checkpoint = path
        log.info("checkpoint %s", path)
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
            module.load_state_dict(state[key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedules.load_state_dict(state["schedules"])
        self.step = int(state["step"])
        self.logbook.load_state_dict(state, self.step)
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        ckpt.set_rng_state(per_rank[self.dist.rank] if self.dist.rank < len(per_rank) else state["rng"])
        self.resumed_from = self.step
        self.last_checkpoint = path
        self.saved_step = self.step
        if self.schedules.lr.t != self.step:
            raise ckpt.CheckpointError(f"{path}: schedule position {self.schedules.lr.t} != step {self.step}")
        log.info("resumed from %s (step %d of %d)", path, self.step, self.total_steps)
        return True

    # -- steps ---------------------------------------------------------------------------
    def next_batch(self, step: int) -> tuple[torch.Tensor, Masks]:
        """data + masks: this rank's (images float [0, 1], masks) of global iteration `step` on the
        device, from the loader workers (ijepa.train_input), which prepare the next steps meanwhile."""
        if self._data_iter is None or self._data_next != step:  # first call, or a jump
            self._data_iter = self.input.batches(step, self.total_steps)
        images, masks = next(self._data_iter)
        self._data_next = step + 1
        self.batches_seen += 1
        return self.input.to_device(images, masks)

    def masks_for(self, step: int) -> Masks:
        """masks: the global batch's masks from (seed, step); this rank's rows."""
        m = self.method.masks(self.global_batch, make_generator(self.cfg.seed, step))
        if self.dist.world_size > 1:
            lo, hi = self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch
            m = Masks(context=m.context[:, lo:hi], targets=m.targets[:, lo:hi], grid=m.grid, target_hw=m.target_hw,
                      context_hw=m.context_hw, context_counts=m.context_counts[:, lo:hi],
                      context_valid=None if m.context_valid is None else m.context_valid[:, lo:hi])
        return m.to(self.device, non_blocking=True)

    def check_finite(self, loss: torch.Tensor, step: int) -> float:
        """Global (mean over ranks) loss as a float; raises NonFiniteLossError if not finite."""
        value = float(all_reduce_mean(loss.detach().float(), self.dist))
        if not math.isfinite(value):
            last = self.last_checkpoint or ckpt.latest_checkpoint(self.ckpt_dir)
            raise NonFiniteLossError(
                f"loss is {value} at step {step + 1} of {self.total_steps} (epoch {step // self.steps_per_epoch}); "
                f"stopped before the optimizer step. Last good checkpoint: {last if last else 'none'}. "
                f"Lower optimisation.lr, check the data, or try precision 'fp32'.")
        return value

    def backward_step(self, loss: torch.Tensor, lr: float, weight_decay: float, want_norm: bool) -> float | None:
        """backward/optimizer: gradients (all-reduced by DDP), optional clipping, AdamW step."""
        apply_schedules(self.optimizer, lr, weight_decay)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = None
        if self.cfg.optimisation.grad_clip is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.trained_params, self.cfg.optimisation.grad_clip))
        elif want_norm:
            norm = grad_norm(self.trained_params)
        self.optimizer.step()
        return norm

    def train_step(self, step: int, images: torch.Tensor | None = None) -> dict[str, Any]:
        """One iteration; `images` (float [0, 1], this rank's batch, on the device) replaces
        the data step, e.g. to time the step alone."""
        want_log = self._is_log_step(step + 1)
        if images is None:
            images, masks = self.next_batch(step)
        else:
            masks = self.masks_for(step)
        values = self.schedules.step()
        loss, h = self.method.loss(self.train_module, images, masks, self.autocast)
        loss_value = self.check_finite(loss, step)
        norm = self.backward_step(loss, values["lr"], values["weight_decay"], want_log)
        self.method.after_step(values["momentum"])
        self.step = step + 1
        out = {"loss": loss_value, "grad_norm": norm, "context_tokens": masks.context.shape[-1], **values}
        if want_log:
            out.update(collapse_stats(h))
        return out

    def _is_log_step(self, done: int) -> bool:
        return done % self.cfg.log_every == 0 or done == self.total_steps

    def log(self, stats: dict[str, Any], elapsed: float, steps_in_window: int, bar) -> None:
        ips = self.global_batch * steps_in_window / elapsed if elapsed > 0 else float("nan")
        self.logbook.add(stats, self.step, self._is_log_step(self.step), (self.step - 1) // self.steps_per_epoch,
                         ips, bar)

    # -- run -----------------------------------------------------------------------------
    def train_loop(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True,
                   disable=not (self.dist.is_main and self.cfg.progress), file=sys.stderr)
        self.method.trained.train()  # the trained modules (a target encoder stays in eval mode)
        try:
            t0, n = time.perf_counter(), 0
            for step in range(self.step, self.total_steps):
                stats = self.train_step(step)
                n += 1
                bar.update(1)
                elapsed = time.perf_counter() - t0
                self.log(stats, elapsed, n, bar)
                if self._is_log_step(self.step):
                    t0, n = time.perf_counter(), 0
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.total_steps:
                    self.save_checkpoint()
                    self._after_checkpoint()
        finally:
            bar.close()

    def _after_checkpoint(self) -> None:
        if self.on_checkpoint is None or not self.dist.is_main:
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.on_checkpoint(self.step, self.method.export_encoder())

    def export(self) -> Path:
        """The method's exported encoder (rank 0), in the format `ijepa.load_encoder` reads."""
        from ijepa.export import save_encoder

        meta = {"dataset": self.shards.dataset, "manifest_sha256": self.shards.manifest_sha256,
                "shard_dir": str(self.shards.root), "step": self.step, "total_steps": self.total_steps,
                "epochs": self.step / self.steps_per_epoch, "final_loss": self.final_loss(),
                "config": self.cfg.to_dict(), "derived": self.derived(),
                "source": f"ijepa.methods.{self.cfg.method} ({type(self.method).__name__}.export_encoder)"}
        return save_encoder(self.method.export_encoder(), self.out_dir / ENCODER_SUBDIR, metadata=meta)

    def final_loss(self) -> float | None:
        return self.logbook.final_loss()

    def finish(self) -> dict[str, Any]:
        summary: dict[str, Any] = {}
        if self.saved_step != self.step:  # same decision on every rank (collective inside)
            self.save_checkpoint()
        counts = self._gather_batch_counts()
        if self.dist.is_main:
            enc_path = self.export()
            self.history.write_csv(self.loss_csv)
            png = self.out_dir / "loss.png"
            from ijepa.viz.training import save_loss_curve_png

            save_loss_curve_png(self.history, png, title=f"{self.method.title} pretraining: {self.shards.dataset}")
            summary = {
                "status": "finished", "steps": self.step, "total_steps": self.total_steps,
                "epochs": self.step / self.steps_per_epoch, "final_loss": self.final_loss(),
                "resumed_from_step": self.resumed_from, "encoder_dir": str(enc_path.parent),
                "checkpoint": str(self.last_checkpoint), "loss_csv": str(self.loss_csv), "loss_png": str(png),
                "collapse_warnings": self.logbook.collapse_warnings, "batches_per_rank": counts,
                "out_dir": str(self.out_dir), **self.derived(),
            }
            ips = [r["img_per_s"] for r in self.history.rows if r.get("img_per_s") is not None
                   and math.isfinite(r["img_per_s"])]
            summary["img_per_s"] = float(np.median(ips)) if ips else None
            atomic.write_json(self.out_dir / SUMMARY, summary)
            self.tracker.log_artifact(png)
            self.tracker.log_artifact(self.loss_csv)
            self.tracker.set_tag("pretrain_status", "finished")
        barrier(self.dist)
        return summary

    def _gather_batch_counts(self) -> list[int]:
        t = torch.tensor([self.batches_seen], dtype=torch.long, device=self.device)
        if not self.dist.distributed:
            return [int(t)]
        import torch.distributed as dist

        out = [torch.zeros_like(t) for _ in range(self.dist.world_size)]
        dist.all_gather(out, t)
        return [int(x) for x in out]

    def run(self) -> dict[str, Any]:
        self.build()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.maybe_resume()
        if self.dist.is_main:
            (self.out_dir / SUMMARY).unlink(missing_ok=True)  # written again when this run finishes
            if not resumed and self.loss_csv.exists():
                self.loss_csv.unlink()  # a stale CSV from an earlier run must not mix in
            atomic.write_json(self.out_dir / "config.json", {"config": self.cfg.to_dict(), "derived": self.derived()})
            self.tracker.log_params({**self.cfg.to_dict(), "derived": self.derived()})
            self.tracker.set_tag("pretrain_status", "running")
            if resumed:
                self.history.write_csv(self.loss_csv)
                self.tracker.set_tag("resumed_from_step", self.step)
        try:
            if self.step < self.total_steps:
                self.train_loop()
        except (NonFiniteLossError, ckpt.CheckpointWriteError) as err:
            if self.dist.is_main:
                with contextlib.suppress(OSError):  # on a full disk this may fail too; the error says why
                    self.history.write_csv(self.loss_csv)
                self.tracker.set_tag("pretrain_status", f"failed: {err}"[:5000])
            raise
        return self.finish()
