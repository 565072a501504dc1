"""The method-agnostic training loop of one process (one rank).

One iteration (`Trainer.train_step`), one optimiser step:
  data     next uint8 batch of this rank (ijepa.train_data), RandomResizedCrop seeded by
           (seed, step), float [0, 1]
  masks    the batch's own masks when the data provides them (this rank's rows), else the
           method's masker on the GLOBAL batch with make_generator(seed, step), this rank's rows
  passes   `accum_steps` forward/backward passes over equal slices of the batch (gradients
           accumulated; DDP/FSDP reduce them only in the last pass), the loss scaled by
           1/accum_steps so the gradient is that of the whole batch's mean loss
  step     AdamW (no weight decay on biases and 1-D params), lr / wd from the schedules,
           optional grad clipping (off by default)
  after    the method's after_step (I-JEPA: EMA of the target encoder, m from the schedule)
  log      every log_every steps: the window's losses read from the device in one transfer
           (NonFiniteLossError at the first NaN/inf), lr, wd, momentum, images/s, grad norm,
           collapse signals; nothing else leaves the device between log steps
  probes   at every monitor.every_checkpoints-th checkpoint step and at the end (monitor.enabled):
           rank 0 scores a copy of the exported encoder on the val split (kNN, linear) before
           the checkpoint, the other ranks wait at a barrier (ijepa.trainer.probing)
  ckpt     every checkpoint_every steps and at the end: losses checked first; a CPU copy
           of the state (full tensors under FSDP) written by a background thread on rank 0
           (atomic; last K kept; one at a time; waited for at the end)

Masks and crops are seeded by the global step, the data order by (seed, epoch) and the
position inside the epoch is step % steps_per_epoch, so a resumed run needs only the step:
with deterministic settings on CPU it reproduces an uninterrupted run bit for bit.
"""
from __future__ import annotations

import contextlib
import copy
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
from ijepa import fsdp
from ijepa.config import ConfigError
from ijepa.distributed import DistInfo, barrier, pick_device, wrap_ddp
from ijepa.masks import derive_seed
from ijepa.models import ViTEncoder, set_grad_checkpointing
from ijepa.precision import autocast_for, resolve_precision
from ijepa.tracking import NullTracker, Tracker
from ijepa.train_data import Augmenter
from ijepa.train_input import TrainInput
from ijepa.trainer.ckpt_writer import CheckpointWriter
from ijepa.trainer.compiling import resolve_compile
from ijepa.trainer.logbook import Logbook
from ijepa.trainer.losses import LossWindow, NonFiniteLossError
from ijepa.trainer.optim import build_optimizer, build_schedules
from ijepa.trainer.plan import TrainPlan
from ijepa.trainer.probing import ProbeMonitor
from ijepa.trainer.process import seed_everything
from ijepa.trainer.state import StateMixin
from ijepa.trainer.steps import StepMixin

__all__ = ["Trainer", "NonFiniteLossError", "CheckpointCallback", "ENCODER_SUBDIR", "SUMMARY"]

log = logging.getLogger("ijepa.trainer")

ENCODER_SUBDIR = "encoder"
SUMMARY = "summary.json"

# Called on rank 0 as on_checkpoint(step, exported encoder) after each checkpoint of the loop
# (e.g. a val probe for Optuna's pruner); it runs under its own RNG fork, so it cannot change
# the training, and an exception it raises (optuna.TrialPruned) ends the run.
CheckpointCallback = Callable[[int, nn.Module], None]


class Trainer(StepMixin, StateMixin):
    """State and steps of one pretraining run in one process (one rank). The step itself is
    `StepMixin` (ijepa.trainer.steps), checkpoint state and resume `StateMixin` (ijepa.trainer.state)."""

    compile_backend = "inductor"  # torch.compile's backend when compiling (tests: "aot_eager")

    def __init__(self, plan: TrainPlan, out_dir: str | Path, tracker: Tracker | None = None,
                 loss_csv: str | Path | None = None, dist_info: DistInfo | None = None,
                 on_checkpoint: CheckpointCallback | None = None, probes_csv: str | Path | None = None):
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
        self.step = 0  # completed iterations (optimiser steps)
        self.logbook = Logbook(self.tracker, self.loss_csv, self.cfg.collapse, self.dist.is_main)
        self.history = self.logbook.history
        self.losses = LossWindow(self.dist)
        self.writer = CheckpointWriter(self.ckpt_dir, self.cfg.keep_last)
        self.probes = ProbeMonitor(self.cfg.monitor, self.shards.root, self.out_dir,
                                   Path(probes_csv) if probes_csv is not None else self.out_dir / "probes.csv",
                                   self.tracker, self.cfg.checkpoint_every, self.dist.is_main)
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
        if cfg.model.grad_checkpointing:
            for module in self.method.checkpoint_modules().values():
                set_grad_checkpointing(module, True)
        o = cfg.optimisation
        self.global_batch = o.batch_size
        self.local_batch = self.global_batch // self.dist.world_size
        self.accum_steps = o.accum_steps
        self.micro_batch = self.local_batch // self.accum_steps
        self.input = TrainInput(cfg, self.shards, self.plan.masker, self.global_batch, self.dist.rank,
                                self.dist.world_size, self.device)  # reader + loader workers (images, masks)
        self.data_mode, self.reader = self.input.mode, self.input.reader
        self.steps_per_epoch = self.reader.steps_per_epoch
        self.total_steps = o.total_steps if o.total_steps is not None else o.epochs * self.steps_per_epoch
        self.schedules = build_schedules(cfg, self.total_steps, self.steps_per_epoch)
        self.augment = Augmenter(cfg.augmentation.enabled, cfg.augmentation.scale, cfg.augmentation.ratio,
                                 cfg.seed, self.global_batch, self.dist.rank, self.dist.world_size)
        self.autocast = autocast_for(cfg.precision, self.device)
        self.sharded = cfg.distributed == "fsdp" and self.dist.distributed
        if self.sharded:  # parameters become DTensor shards: before the optimiser sees them
            fsdp.shard_modules(self.method.trained, *[m for m in self.method.checkpoint_modules().values()
                                                      if not _inside(m, self.method.trained)])
            self.train_module: nn.Module = self.method.trained
        else:
            self.train_module = wrap_ddp(self.method.trained, self.dist)
        self.trained_params = [p for p in self.method.trained.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg, *self.method.trained.children())
        self.compiled = resolve_compile(cfg.compile, self.device)
        if self.compiled:
            self.train_module = torch.compile(self.train_module, backend=self.compile_backend)
            self.method.compile(self.compile_backend)

    def derived(self) -> dict[str, Any]:
        return {"img_size": self.shards.image_size, "in_chans": self.shards.channels,
                "grid": list(self.plan.model.encoder.grid), "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch, "global_batch": self.global_batch,
                "local_batch": self.local_batch, "accum_steps": self.accum_steps, "micro_batch": self.micro_batch,
                "world_size": self.dist.world_size, "distributed": "fsdp" if self.sharded else (
                    "ddp" if self.dist.distributed else "none"), "compiled": self.compiled,
                "data_mode": self.data_mode, "precision": resolve_precision(self.cfg.precision, self.device),
                "device": str(self.device), "dataset": self.shards.dataset,
                "manifest_sha256": self.shards.manifest_sha256, "method": self.cfg.method,
                **self.method.derived()}

    def _is_log_step(self, done: int) -> bool:
        return done % self.cfg.log_every == 0 or done == self.total_steps

    def _is_checkpoint_step(self, done: int) -> bool:
        return done % self.cfg.checkpoint_every == 0 or done == self.total_steps

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
                is_log, is_ckpt = self._is_log_step(self.step), self._is_checkpoint_step(self.step)
                if is_log or is_ckpt:  # the only host syncs: read the losses (raises on NaN/inf)
                    self.flush_losses()
                if is_log:
                    self.log(self.read_stats(stats), time.perf_counter() - t0, n, bar)
                    t0, n = time.perf_counter(), 0
                if is_ckpt:
                    self._probe_along()  # before the checkpoint: it keeps its own step's score
                    self.save_checkpoint()
                    self._after_checkpoint()
        finally:
            bar.close()

    def _probe_along(self) -> None:
        """Probes along training at this step when due (ijepa.trainer.probing): rank 0 scores a
        copy of the exported encoder; every rank meets at the barrier after it."""
        if not self.probes.due(self.step, self.total_steps):
            return
        gathered = self._gathered_encoder()  # FSDP: full weights on rank 0 (a collective, every rank)
        if self.dist.is_main:
            self.writer.wait()  # the checkpoint in flight is complete before best folders rotate
            encoder = gathered if gathered is not None else copy.deepcopy(self.method.export_encoder())
            encoder.eval().requires_grad_(False)  # a copy: the live modules keep their mode and flags
            self.probes.record(self.step, encoder, self.device, metadata=self._encoder_metadata())
            del encoder
        barrier(self.dist)

    def _after_checkpoint(self) -> None:
        if self.on_checkpoint is None or not self.dist.is_main:
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.on_checkpoint(self.step, self.method.export_encoder())

    def export(self, encoder: nn.Module | None = None) -> Path:
        """The method's exported encoder (rank 0), in the format `ijepa.load_encoder` reads."""
        from ijepa.export import load_encoder, save_encoder

        meta = self._encoder_metadata()
        if self.probes.enabled:
            meta["monitor"] = self.probes.summary()
        meta["export"] = self.cfg.export
        if self.cfg.export == "best":  # the best-scoring step's encoder, kept by ijepa.trainer.probing
            best_dir = self.probes.best_encoder_dir()
            encoder = load_encoder(best_dir)
            meta["step"] = self.probes.best()["step"]
            meta["epochs"] = meta["step"] / self.steps_per_epoch
        return save_encoder(encoder if encoder is not None else self.method.export_encoder(),
                            self.out_dir / ENCODER_SUBDIR, metadata=meta)

    def _encoder_metadata(self) -> dict[str, Any]:
        """encoder.json's metadata of the encoder at this step (`step`: the step its weights are from)."""
        return {"dataset": self.shards.dataset, "manifest_sha256": self.shards.manifest_sha256,
                "shard_dir": str(self.shards.root), "step": self.step, "total_steps": self.total_steps,
                "epochs": self.step / self.steps_per_epoch, "final_loss": self.final_loss(),
                "config": self.cfg.to_dict(), "derived": self.derived(),
                "source": f"ijepa.methods.{self.cfg.method} ({type(self.method).__name__}.export_encoder)"}

    def _gathered_encoder(self) -> nn.Module | None:
        """Under FSDP: the exported encoder with full weights, on CPU (a collective; rank 0
        gets it). Otherwise None: the method's own module is exported."""
        if not self.sharded:
            return None
        module = self.method.export_encoder()
        state = fsdp.full_state_dict(module)
        if not self.dist.is_main:
            return None
        plain = ViTEncoder(module.cfg)
        plain.load_state_dict(state)
        return plain.eval()

    def final_loss(self) -> float | None:
        return self.logbook.final_loss()

    def finish(self) -> dict[str, Any]:
        summary: dict[str, Any] = {}
        if self.saved_step != self.step:  # same decision on every rank (collective inside)
            self.flush_losses()
            self.save_checkpoint()
        self.writer.wait()  # the last checkpoint is complete before anything reports success
        self.probes.settle()
        counts = self._gather_batch_counts()
        encoder = self._gathered_encoder() if self.cfg.export == "last" else None
        if self.dist.is_main:
            enc_path = self.export(encoder)
            self.history.write_csv(self.loss_csv)
            png = self.out_dir / "loss.png"
            from ijepa.viz.training import save_loss_curve_png

            save_loss_curve_png(self.history, png, title=f"{self.method.title} pretraining: {self.shards.dataset}",
                                probes=self.probes.history if self.probes.history.rows else None)
            summary = {
                "status": "finished", "steps": self.step, "total_steps": self.total_steps,
                "epochs": self.step / self.steps_per_epoch, "final_loss": self.final_loss(),
                "resumed_from_step": self.resumed_from, "encoder_dir": str(enc_path.parent),
                "checkpoint": str(self.last_checkpoint), "loss_csv": str(self.loss_csv), "loss_png": str(png),
                "collapse_warnings": self.logbook.collapse_warnings, "batches_per_rank": counts,
                "out_dir": str(self.out_dir), "export": self.cfg.export,
                "exported_step": self.probes.best()["step"] if self.cfg.export == "best" else self.step,
                **self.derived(),
            }
            if self.probes.enabled:
                summary["probes"] = self.probes.summary()
                summary["probes_csv"] = str(self.probes.csv_path)
            ips = [r["img_per_s"] for r in self.history.rows if r.get("img_per_s") is not None
                   and math.isfinite(r["img_per_s"])]
            summary["img_per_s"] = float(np.median(ips)) if ips else None
            atomic.write_json(self.out_dir / SUMMARY, summary)
            self.tracker.log_artifact(png)
            self.tracker.log_artifact(self.loss_csv)
            if self.probes.enabled and self.probes.csv_path.is_file():
                self.tracker.log_artifact(self.probes.csv_path)
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
            if not resumed:
                self.probes.start_fresh()
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
            with contextlib.suppress(Exception):  # a write in flight finishes (or fails) first
                self.writer.wait(raise_errors=False)
            if self.dist.is_main:
                with contextlib.suppress(OSError):  # on a full disk this may fail too; the error says why
                    self.history.write_csv(self.loss_csv)
                self.tracker.set_tag("pretrain_status", f"failed: {err}"[:5000])
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                self.writer.wait(raise_errors=False)
            raise
        return self.finish()


def _inside(module: nn.Module, root: nn.Module) -> bool:
    return any(m is module for m in root.modules())
