"""The method-agnostic pretraining trainer, split by concern:

  plan      everything checked before any work (config, shards, model, masker), once
  loop      `Trainer`: one process's loop, logging, checkpoints, export
  steps     one optimiser step: data, masks, accumulated passes, AdamW, after-step (no host reads)
  state     checkpoint state (CPU copies, full tensors under FSDP) and resume
  losses    the device-side loss window, read every log_every steps (NaN/inf stop)
  ckpt_writer  background checkpoint writes (atomic, one at a time, waited for)
  compiling `compile: auto`, dynamic mask lengths, dynamo's counters
  optim     AdamW parameter groups and the per-iteration schedules
  resume    the resume policy (what may continue a run folder; retiring stale checkpoints)
  process   threads, determinism and seeds of the process
  launch    `run_pretraining`: in-process, or torchrun for nproc > 1

The objective itself is a `ijepa.methods.Method`.
"""
from ijepa.trainer.launch import launch_torchrun, run_pretraining, train, train_worker
from ijepa.trainer.loop import ENCODER_SUBDIR, SUMMARY, NonFiniteLossError, Trainer
from ijepa.trainer.plan import TrainPlan, prepare
from ijepa.trainer.resume import ResumeMismatchError, config_differences, retire_stale_checkpoints

__all__ = ["run_pretraining", "train", "train_worker", "launch_torchrun", "Trainer", "TrainPlan", "prepare",
           "NonFiniteLossError", "ResumeMismatchError", "config_differences", "retire_stale_checkpoints",
           "ENCODER_SUBDIR", "SUMMARY"]
