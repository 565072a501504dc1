"""I-JEPA pretraining loop (DESIGN.md §3, §5, §7), built from small named steps.

    run_pretraining(cfg, shard_dir, out_dir, tracker=None, loss_csv=None) -> summary dict

runs in-process when ``cfg.nproc == 1`` and otherwise launches
``python -m torch.distributed.run --standalone --nproc_per_node N -m ijepa.pretrain_main``
(see `ijepa.pretrain_main`), checking its exit code and re-raising its error.

One iteration (`Pretrainer.train_step`):
  data     next uint8 batch of this rank (ijepa.train_data), RandomResizedCrop seeded by
           (seed, step), float [0, 1]
  masks    MaskGenerator on the GLOBAL batch with make_generator(seed, step), this rank's rows
  forward  target encoder (EMA, no grad) on the full image -> layer_norm (no affine) ->
           gathered per target block; context encoder on the context tokens only;
           predictor at the target positions; loss "l2" (MSE, paper) or "smooth_l1" (ref. code)
  check    global loss finite, else NonFiniteLossError naming the step (nothing is stepped)
  backward AdamW (no weight decay on biases and 1-D params), lr / wd from the schedules,
           optional grad clipping (off by default)
  ema      target <- m * target + (1 - m) * encoder, m from the momentum schedule
  log      every log_every steps: loss, lr, wd, momentum, images/s, grad norm, collapse signals
  ckpt     every checkpoint_every steps and at the end (rank 0; atomic; last K kept)

``method: mae`` runs the MAE baseline in this same trainer: `ijepa.mae.MaePretrainer` overrides
the method hooks (build_modules, checkpoint_modules, eval_encoder, forward_loss, ema_update, export).

With ``nenc > 1`` every context block is encoded (images repeated along the batch) and
predicts every target block, as in the reference code; the loss averages over all pairs.

Masks and crops are seeded by the global step, the data order by (seed, epoch) and the
position inside the epoch is step % steps_per_epoch, so a resumed run needs only the step:
with deterministic settings on CPU it reproduces an uninterrupted run bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ijepa import checkpoint as ckpt
from ijepa import atomic
from ijepa.config import ConfigError, from_mapping
from ijepa.distributed import DistInfo, all_reduce_mean, barrier, pick_device, wrap_ddp
from ijepa.masks import MaskGenerator, Masks, derive_seed, make_generator
from ijepa.models import ModelConfig, ViTEncoder, Predictor, count_params, gather_tokens
from ijepa.monitor import LossHistory, collapse_stats
from ijepa.precision import Fp32CoreAttention, adapt_for_precision, autocast_for, resolve_precision
from ijepa.schedules import Cosine, Linear, TrainSchedules, WarmupCosine
from ijepa.tracking import MlflowTracker, NullTracker, Tracker
from ijepa.train_config import (RESUME_SAFE_FIELDS, PretrainConfig, check_against_data)
from ijepa.train_data import Augmenter, MemoryBatches, ShardInfo, StreamBatches, load_train_images, read_shard_info

__all__ = ["PretrainConfig", "NonFiniteLossError", "ResumeMismatchError", "run_pretraining", "train_worker",
           "Pretrainer", "ContextPath", "param_groups", "build_optimizer", "build_schedules", "jepa_loss",
           "ema_update_", "target_tokens", "forward_jepa", "load_config", "Fp32CoreAttention", "adapt_for_precision",
           "pretrainer_class"]

log = logging.getLogger("ijepa.train")

ENCODER_SUBDIR = "encoder"
SUMMARY = "summary.json"
FAILURE = "failure.json"


CheckpointCallback = Callable[[int, nn.Module], None]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before stepping the optimizer."""


class ResumeMismatchError(ConfigError):
    """The run folder holds a checkpoint made with a config that the current one contradicts."""


def load_config(cfg: PretrainConfig | Mapping[str, Any] | None) -> PretrainConfig:
    return from_mapping(PretrainConfig, cfg, "pretrain")


# ----------------------------------------------------------------------- building blocks
class ContextPath(nn.Module):
    """Context encoder + predictor: the trained part, wrapped by DDP as one module."""

    def __init__(self, encoder: ViTEncoder, predictor: Predictor):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, images: torch.Tensor, context: torch.Tensor, targets: torch.Tensor,
                context_valid: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, C, H, W]; context [nenc, B, Nc]; targets [M, B, Nt] ->
        predictions [M * nenc * B, Nt, D], ordered (target block, context block, image)."""
        nenc, b, nc = context.shape
        keep = context.reshape(nenc * b, nc)
        valid = None if context_valid is None else context_valid.reshape(nenc * b, nc)
        imgs = images if nenc == 1 else images.repeat(nenc, 1, 1, 1)
        z = self.encoder(imgs, keep=keep, keep_valid=valid)
        tgt = targets if nenc == 1 else targets.repeat(1, nenc, 1)
        return self.predictor(z, keep, tgt, ctx_valid=valid)


def target_tokens(h: torch.Tensor, targets: torch.Tensor, nenc: int = 1) -> torch.Tensor:
    """Target-encoder output h [B, N, D] -> layer_norm (no affine) -> gathered per target
    block, [M * nenc * B, Nt, D] in ContextPath's order."""
    h = F.layer_norm(h, (h.shape[-1],))
    m, b, nt = targets.shape
    idx = targets if nenc == 1 else targets.repeat(1, nenc, 1)
    return gather_tokens(h.repeat(m * nenc, 1, 1), idx.reshape(m * nenc * b, nt))


def jepa_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """"l2": mean squared error (paper); "smooth_l1": Huber with beta 1 (reference code). fp32."""
    pred, target = pred.float(), target.float()
    if kind == "l2":
        return F.mse_loss(pred, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=1.0)
    raise ConfigError(f"loss: unknown loss {kind!r}; choose 'l2' or 'smooth_l1'")


def forward_jepa(context_path: nn.Module, target_encoder: nn.Module, images: torch.Tensor, masks: Masks,
                 loss_kind: str = "l2", autocast: contextlib.AbstractContextManager | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One I-JEPA forward: (loss, raw target-encoder output h [B, N, D])."""
    with autocast if autocast is not None else contextlib.nullcontext():
        with torch.no_grad():
            h = target_encoder(images)
            tgt = target_tokens(h, masks.targets, masks.context.shape[0])
        pred = context_path(images, masks.context, masks.targets, masks.context_valid)
    return jepa_loss(pred, tgt, loss_kind), h


def param_groups(*modules: nn.Module) -> list[dict[str, Any]]:
    """Two AdamW groups: weights with decay, biases and 1-D params (norms) without."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if name.endswith("bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "name": "decay", "wd_exclude": False},
            {"params": no_decay, "name": "no_decay", "wd_exclude": True, "weight_decay": 0.0}]


def build_optimizer(cfg: PretrainConfig, *modules: nn.Module) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel (one pass over all parameters; CPU and
    CUDA) when this torch build has it for the parameters' device."""
    o = cfg.optimisation
    groups = param_groups(*modules)
    kwargs = dict(lr=o.start_lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(param_groups(*modules), **kwargs)


def build_schedules(cfg: PretrainConfig, total_steps: int, steps_per_epoch: int) -> TrainSchedules:
    o = cfg.optimisation
    warmup = o.warmup_steps if o.warmup_steps is not None else int(round(o.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, total_steps)
    return TrainSchedules(
        lr=WarmupCosine(o.start_lr, o.lr, o.final_lr, warmup, total_steps),
        weight_decay=Cosine(o.weight_decay, o.final_weight_decay, total_steps),
        momentum=Linear(o.ema_momentum, o.final_ema_momentum, total_steps))


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if not group.get("wd_exclude", False):
            group["weight_decay"] = weight_decay


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter."""
    tp = list(target.parameters())
    op = [p.detach() for p in online.parameters()]
    if len(tp) != len(op):
        raise RuntimeError("EMA: target and online networks differ in their parameters")
    torch._foreach_mul_(tp, momentum)
    torch._foreach_add_(tp, op, alpha=1.0 - momentum)


def grad_norm(params: list[torch.Tensor]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    random.seed(seed)


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Fields (dotted) whose values differ, ignoring RESUME_SAFE_FIELDS."""
    a, b = _flat(saved), _flat(current)
    for key, default in _flat({"method": "ijepa", "mae": PretrainConfig().to_dict()["mae"]}).items():
        a.setdefault(key, default)  # checkpoints from before the MAE baseline: I-JEPA, mae defaults
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_SAFE_FIELDS:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: checkpoint has {a.get(key, '<absent>')!r}, config has {b.get(key, '<absent>')!r}")
    return diffs


@contextlib.contextmanager
def process_settings(cfg: PretrainConfig, dist_info: DistInfo):
    """Threads, determinism and the global RNG states for the run, restored afterwards
    (so an in-process run leaves the caller's process as it found it)."""
    old_rng = ckpt.rng_state()
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_bench = torch.backends.cudnn.benchmark
    try:
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        elif dist_info.world_size > 1 and dist_info.device.type == "cpu":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", dist_info.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        yield
    finally:
        ckpt.set_rng_state(old_rng)
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
        torch.backends.cudnn.benchmark = old_bench


# ---------------------------------------------------------------------------- the trainer
class Pretrainer:
    """State and steps of one pretraining run in one process (one rank)."""

    def __init__(self, cfg: PretrainConfig, shards: ShardInfo, out_dir: str | Path, tracker: Tracker | None = None,
                 loss_csv: str | Path | None = None, dist_info: DistInfo | None = None,
                 on_checkpoint: "CheckpointCallback | None" = None):
        self.cfg = cfg
        # Called on rank 0 as on_checkpoint(step, target_encoder) after each checkpoint of the
        # loop (e.g. a val probe for Optuna's pruner); it runs under its own RNG fork, so it
        # cannot change the training, and an exception it raises (optuna.TrialPruned) ends the run.
        self.on_checkpoint = on_checkpoint
        self.shards = shards
        self.out_dir = Path(out_dir)
        self.dist = dist_info or DistInfo(device=pick_device(0, cfg.device))
        self.tracker: Tracker = tracker if (tracker is not None and self.dist.is_main) else NullTracker()
        self.loss_csv = Path(loss_csv) if loss_csv is not None else self.out_dir / "loss.csv"
        self.ckpt_dir = self.out_dir / ckpt.CHECKPOINT_SUBDIR
        self.device = self.dist.device
        self.step = 0  # completed iterations
        self.history = LossHistory()
        self.resumed_from: int | None = None
        self.last_checkpoint: Path | None = None
        self.saved_step: int | None = None
        self.collapse_warnings = 0
        self.batches_seen = 0
        self._window = {"loss_sum": 0.0, "count": 0}
        self._data_iter = None
        self._data_epoch: int | None = None

    # -- build ---------------------------------------------------------------------------
    def build(self) -> None:
        cfg, sh = self.cfg, self.shards
        if self.dist.world_size != cfg.nproc:
            raise ConfigError(f"nproc: the config says {cfg.nproc} processes but {self.dist.world_size} were started")
        self.model_cfg: ModelConfig = check_against_data(cfg, sh.image_size, sh.channels, sh.train_samples,
                                                         f"{sh.root / 'manifest.json'}")
        seed_everything(cfg.seed)
        self.build_modules()
        # identical weights on every rank (above); from here on each rank has its own torch
        # stream (drop_path), rank 0's being the single-process one
        torch.manual_seed(derive_seed(cfg.seed, 303, self.dist.rank))
        self.trained_params = [p for p in self.context_path.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg, *self.context_path.children())
        self.global_batch = cfg.optimisation.batch_size
        self.local_batch = self.global_batch // self.dist.world_size
        self.data_mode = self._data_mode()
        self.reader = self._build_reader()
        self.steps_per_epoch = self.reader.steps_per_epoch
        o = cfg.optimisation
        self.total_steps = o.total_steps if o.total_steps is not None else o.epochs * self.steps_per_epoch
        self.schedules = build_schedules(cfg, self.total_steps, self.steps_per_epoch)
        self.augment = Augmenter(cfg.augmentation.enabled, cfg.augmentation.scale, cfg.augmentation.ratio,
                                 cfg.seed, self.global_batch, self.dist.rank, self.dist.world_size)
        self.autocast = autocast_for(cfg.precision, self.device)
        self.ddp_module = wrap_ddp(self.context_path, self.dist)
        self.train_module: nn.Module = self.ddp_module
        self.target_forward: nn.Module | None = getattr(self, "target_encoder", None)
        if cfg.compile:
            self.train_module = torch.compile(self.ddp_module)
            if self.target_forward is not None:
                self.target_forward = torch.compile(self.target_forward)

    # -- method hooks (ijepa.mae.MaePretrainer overrides them for the MAE baseline) ------
    method_title = "I-JEPA"

    def build_modules(self) -> None:
        """The networks (same initial weights on every rank), `context_path` (the trained
        module; the optimizer gets its children), and `mask_gen` (batch, generator) -> Masks."""
        enc = self.model_cfg.encoder
        self.encoder = ViTEncoder(enc).to(self.device)
        self.predictor = Predictor(enc, self.model_cfg.predictor).to(self.device)
        self.target_encoder = ViTEncoder(enc).to(self.device)
        self.target_encoder.load_state_dict(self.encoder.state_dict())
        self.target_encoder.requires_grad_(False).eval()
        for module in (self.encoder, self.predictor, self.target_encoder):
            adapt_for_precision(module, self.cfg.precision, self.device)
        self.context_path = ContextPath(self.encoder, self.predictor)
        self.mask_gen = MaskGenerator(self.cfg.masks, enc.grid)

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Modules saved in (and restored from) checkpoints, by state-dict key."""
        return {"encoder": self.encoder, "predictor": self.predictor, "target_encoder": self.target_encoder}

    def eval_encoder(self) -> ViTEncoder:
        """The encoder that is exported and evaluated: the EMA target encoder."""
        return self.target_encoder

    def _data_mode(self) -> str:
        d = self.cfg.data
        if d.mode != "auto":
            return d.mode
        return "memory" if self.shards.train_bytes <= d.memory_limit_mb * 2 ** 20 else "stream"

    def _build_reader(self):
        cfg, r, w = self.cfg, self.dist.rank, self.dist.world_size
        if self.data_mode == "memory":
            images = load_train_images(self.shards)
            expect = (self.shards.channels, self.shards.image_size, self.shards.image_size)
            if tuple(images.shape[1:]) != expect:
                raise ConfigError(f"{self.shards.root}: train images are {tuple(images.shape[1:])}, "
                                  f"the manifest says {expect}")
            return MemoryBatches(images, self.global_batch, r, w, cfg.seed)
        return StreamBatches(self.shards, self.global_batch, r, w, cfg.seed, cfg.num_workers,
                             cfg.data.shuffle_buffer)

    def derived(self) -> dict[str, Any]:
        return {"img_size": self.shards.image_size, "in_chans": self.shards.channels,
                "grid": list(self.model_cfg.encoder.grid), "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch, "global_batch": self.global_batch,
                "local_batch": self.local_batch, "world_size": self.dist.world_size,
                "data_mode": self.data_mode, "precision": resolve_precision(self.cfg.precision, self.device),
                "device": str(self.device), "dataset": self.shards.dataset,
                "manifest_sha256": self.shards.manifest_sha256, "method": self.cfg.method,
                **{f"{k}_params": count_params(m) for k, m in self.checkpoint_modules().items()
                   if k != "target_encoder"}}

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
            **{k: m.state_dict() for k, m in self.checkpoint_modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "schedules": self.schedules.state_dict(), "rng": rng[0], "rng_per_rank": rng,
            "data": {"mode": self.data_mode, "epoch": epoch, "batch": batch, "steps_per_epoch": self.steps_per_epoch,
                     "global_batch": self.global_batch, "world_size": self.dist.world_size, "seed": self.cfg.seed},
            "config": self.cfg.to_dict(), "dataset": self.shards.dataset,
            "manifest_sha256": self.shards.manifest_sha256, "history": self.history.state_dict(),
            "log_window": dict(self._window),
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
        self.check_resume_compatible(path, state)
        for key, module in self.checkpoint_modules().items():
            module.load_state_dict(state[key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedules.load_state_dict(state["schedules"])
        self.history.load_state_dict(state["history"])
        self._window = {"loss_sum": float(state["log_window"]["loss_sum"]),
                        "count": int(state["log_window"]["count"])}
        self.step = int(state["step"])
        self.history.truncate(self.step)
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        ckpt.set_rng_state(per_rank[self.dist.rank] if self.dist.rank < len(per_rank) else state["rng"])
        self.resumed_from = self.step
        self.last_checkpoint = path
        self.saved_step = self.step
        if self.schedules.lr.t != self.step:
            raise ckpt.CheckpointError(f"{path}: schedule position {self.schedules.lr.t} != step {self.step}")
        log.info("resumed from %s (step %d of %d)", path, self.step, self.total_steps)
        return True

    def check_resume_compatible(self, path: Path, state: Mapping[str, Any]) -> None:
        saved_cfg = state.get("config", {})
        problems = config_differences(saved_cfg, self.cfg.to_dict())
        if self.data_mode == "stream" and saved_cfg.get("num_workers") != self.cfg.num_workers:
            # the streamed order interleaves the workers' streams: another count, another order
            problems.append(f"num_workers: checkpoint has {saved_cfg.get('num_workers')!r}, config has "
                            f"{self.cfg.num_workers!r} (the streaming data order depends on it)")
        if state.get("manifest_sha256") != self.shards.manifest_sha256:
            problems.append(f"shard manifest sha256: checkpoint has {state.get('manifest_sha256')}, "
                            f"{self.shards.root / 'manifest.json'} has {self.shards.manifest_sha256} (different data)")
        data = state.get("data", {})
        for key, mine in (("steps_per_epoch", self.steps_per_epoch), ("world_size", self.dist.world_size),
                          ("mode", self.data_mode)):
            if data.get(key) != mine:
                problems.append(f"data.{key}: checkpoint has {data.get(key)!r}, this run has {mine!r}")
        if int(state.get("total_steps", -1)) != self.total_steps:
            problems.append(f"total_steps: checkpoint has {state.get('total_steps')}, this run has {self.total_steps}")
        if problems:
            raise ResumeMismatchError(
                f"cannot resume from {path}: the run folder {self.out_dir} holds a checkpoint of a different "
                f"configuration, so resuming would not continue the same run:\n  " + "\n  ".join(problems) +
                f"\nUse a new output folder, or delete {self.ckpt_dir} to start over.")

    # -- steps ---------------------------------------------------------------------------
    def next_images(self, step: int) -> torch.Tensor:
        """data: this rank's batch for global iteration `step`, augmented, float [0, 1]."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._data_epoch != epoch or self._data_iter is None:
            self._data_iter = iter(self.reader.batches(epoch, k))
            self._data_epoch = epoch
        raw = next(self._data_iter)
        self.batches_seen += 1
        return self.augment(raw, step, self.device)

    def masks_for(self, step: int) -> Masks:
        """masks: the global batch's masks from (seed, step); this rank's rows."""
        m = self.mask_gen(self.global_batch, make_generator(self.cfg.seed, step))
        if self.dist.world_size > 1:
            lo, hi = self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch
            m = Masks(context=m.context[:, lo:hi], targets=m.targets[:, lo:hi], grid=m.grid, target_hw=m.target_hw,
                      context_hw=m.context_hw, context_counts=m.context_counts[:, lo:hi],
                      context_valid=None if m.context_valid is None else m.context_valid[:, lo:hi])
        return m.to(self.device, non_blocking=True)

    def forward_loss(self, images: torch.Tensor, masks: Masks) -> tuple[torch.Tensor, torch.Tensor]:
        """forward/loss: module-level functions, so tests can wrap them."""
        return forward_jepa(self.train_module, self.target_forward, images, masks, self.cfg.loss, self.autocast)

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

    def ema_update(self, momentum: float) -> None:
        ema_update_(self.target_encoder, self.encoder, momentum)

    def train_step(self, step: int) -> dict[str, Any]:
        want_log = self._is_log_step(step + 1)
        images = self.next_images(step)
        masks = self.masks_for(step)
        values = self.schedules.step()
        loss, h = self.forward_loss(images, masks)
        loss_value = self.check_finite(loss, step)
        norm = self.backward_step(loss, values["lr"], values["weight_decay"], want_log)
        self.ema_update(values["momentum"])
        self.step = step + 1
        out = {"loss": loss_value, "grad_norm": norm, "context_tokens": masks.context.shape[-1], **values}
        if want_log:
            out.update(collapse_stats(h))
        return out

    def _is_log_step(self, done: int) -> bool:
        return done % self.cfg.log_every == 0 or done == self.total_steps

    def log(self, stats: dict[str, Any], elapsed: float, steps_in_window: int, bar) -> None:
        """log: window-mean loss and the rest at log steps (rank 0 writes CSV / tracker)."""
        self._window["loss_sum"] += stats["loss"]
        self._window["count"] += 1
        if not self._is_log_step(self.step):
            return
        loss = self._window["loss_sum"] / max(1, self._window["count"])
        self._window = {"loss_sum": 0.0, "count": 0}
        ips = self.global_batch * steps_in_window / elapsed if elapsed > 0 else float("nan")
        row = {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch, "loss": loss,
               "lr": stats["lr"], "weight_decay": stats["weight_decay"], "ema_momentum": stats["momentum"],
               "grad_norm": stats["grad_norm"], "target_std": stats.get("target_std"),
               "effective_rank": stats.get("effective_rank"), "context_tokens": stats["context_tokens"],
               "img_per_s": ips}
        self.history.append(row)
        if not self.dist.is_main:
            return
        self.history.write_csv(self.loss_csv)
        self.tracker.log_metrics({k: v for k, v in row.items() if k != "step" and v is not None}, self.step)
        self._check_collapse(row)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{stats['lr']:.2e}", img_s=f"{ips:.0f}", refresh=False)

    def _check_collapse(self, row: Mapping[str, Any]) -> None:
        c = self.cfg.collapse
        std, rank = row.get("target_std"), row.get("effective_rank")
        bad = []
        if std is not None and math.isfinite(std) and std < c.std_min:
            bad.append(f"target_std={std:.3g} < {c.std_min}")
        if rank is not None and math.isfinite(rank) and rank < c.rank_min:
            bad.append(f"effective_rank={rank:.3g} < {c.rank_min}")
        if bad:
            self.collapse_warnings += 1
            msg = f"possible representation collapse at step {row['step']}: " + ", ".join(bad)
            log.warning(msg)
            self.tracker.set_tag("collapse_warning", msg)

    # -- run -----------------------------------------------------------------------------
    def train_loop(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True,
                   disable=not (self.dist.is_main and self.cfg.progress), file=sys.stderr)
        self.context_path.train()  # the trained modules (the target encoder stays in eval mode)
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
            self.on_checkpoint(self.step, self.eval_encoder())

    def export(self) -> Path:
        """The final TARGET encoder (rank 0)."""
        meta = {"dataset": self.shards.dataset, "manifest_sha256": self.shards.manifest_sha256,
                "shard_dir": str(self.shards.root), "step": self.step, "total_steps": self.total_steps,
                "epochs": self.step / self.steps_per_epoch, "final_loss": self.final_loss(),
                "config": self.cfg.to_dict(), "derived": self.derived(), "source": "ijepa.train (target encoder, EMA)"}
        return save_encoder_target(self.target_encoder, self.out_dir / ENCODER_SUBDIR, meta)

    def final_loss(self) -> float | None:
        return float(self.history.rows[-1]["loss"]) if self.history.rows else None

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

            save_loss_curve_png(self.history, png, title=f"{self.method_title} pretraining: {self.shards.dataset}")
            summary = {
                "status": "finished", "steps": self.step, "total_steps": self.total_steps,
                "epochs": self.step / self.steps_per_epoch, "final_loss": self.final_loss(),
                "resumed_from_step": self.resumed_from, "encoder_dir": str(enc_path.parent),
                "checkpoint": str(self.last_checkpoint), "loss_csv": str(self.loss_csv), "loss_png": str(png),
                "collapse_warnings": self.collapse_warnings, "batches_per_rank": counts,
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
        except NonFiniteLossError as err:
            if self.dist.is_main:
                self.history.write_csv(self.loss_csv)
                self.tracker.set_tag("pretrain_status", f"failed: {err}"[:5000])
            raise
        return self.finish()


def save_encoder_target(target_encoder: ViTEncoder, out: Path, metadata: dict[str, Any]) -> Path:
    from ijepa.export import save_encoder

    return save_encoder(target_encoder, out, metadata=metadata)


# ------------------------------------------------------------------------------ entry points
def train_worker(cfg: PretrainConfig, shard_dir: str | Path, out_dir: str | Path, tracker: Tracker | None = None,
                 loss_csv: str | Path | None = None, dist_info: DistInfo | None = None,
                 verified: bool = False, on_checkpoint: "CheckpointCallback | None" = None) -> dict[str, Any]:
    """The body of one process: checks, then trains, checkpoints and exports (rank 0).

    `verified`: the caller already checked the shards' sha256 (skip `data.verify`)."""
    cfg = load_config(cfg)
    shards = read_shard_info(shard_dir, verify=cfg.data.verify and not verified)
    check_against_data(cfg, shards.image_size, shards.channels, shards.train_samples,
                       str(shards.root / "manifest.json"))
    dist_info = dist_info or DistInfo(device=pick_device(0, cfg.device))
    with process_settings(cfg, dist_info):
        return pretrainer_class(cfg)(cfg, shards, out_dir, tracker, loss_csv, dist_info,
                                     on_checkpoint=on_checkpoint).run()


def pretrainer_class(cfg: PretrainConfig) -> type[Pretrainer]:
    """`Pretrainer` for method "ijepa", `ijepa.mae.MaePretrainer` for "mae" (the MAE baseline)."""
    if cfg.method == "mae":
        from ijepa.mae import MaePretrainer

        return MaePretrainer
    return Pretrainer


def run_pretraining(cfg: PretrainConfig | Mapping[str, Any], shard_dir: str | Path, out_dir: str | Path,
                    tracker: Tracker | None = None, loss_csv: str | Path | None = None,
                    on_checkpoint: "CheckpointCallback | None" = None) -> dict[str, Any]:
    """Pretrain I-JEPA (or the MAE baseline: ``method: mae``, `ijepa.mae`) on the train split
    of `shard_dir`; outputs in `out_dir`.

    Resumes automatically from the newest checkpoint in ``out_dir/checkpoints`` (a config
    that contradicts it raises ResumeMismatchError); a finished run only re-exports.
    Returns the run summary (also written to ``out_dir/summary.json``).
    `on_checkpoint(step, target_encoder)`: see `Pretrainer` (in-process runs only, nproc 1).
    """
    cfg = load_config(cfg)
    shards = read_shard_info(shard_dir, verify=cfg.data.verify)  # validate everything before any work
    check_against_data(cfg, shards.image_size, shards.channels, shards.train_samples,
                       str(shards.root / "manifest.json"))
    if cfg.nproc == 1:
        return train_worker(cfg, shard_dir, out_dir, tracker, loss_csv, verified=True, on_checkpoint=on_checkpoint)
    if on_checkpoint is not None:
        raise ConfigError(f"nproc: an on_checkpoint callback needs an in-process run (nproc 1), got nproc {cfg.nproc}")
    return launch_torchrun(cfg, shard_dir, out_dir, tracker, loss_csv)


_ERRORS: dict[str, type[BaseException]] = {
    "NonFiniteLossError": NonFiniteLossError, "ResumeMismatchError": ResumeMismatchError,
    "ConfigError": ConfigError, "CheckpointError": ckpt.CheckpointError,
}


def torchrun_command(cfg_path: Path, shard_dir: str | Path, out_dir: str | Path, nproc: int,
                     loss_csv: str | Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ijepa.pretrain_main", "--config", str(cfg_path), "--shards", str(shard_dir), "--out", str(out_dir)]
    if loss_csv is not None:
        cmd += ["--loss-csv", str(loss_csv)]
    return cmd + ["--skip-verify"]  # the launcher verified the shards already


def launch_torchrun(cfg: PretrainConfig, shard_dir: str | Path, out_dir: str | Path, tracker: Tracker | None = None,
                    loss_csv: str | Path | None = None) -> dict[str, Any]:
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
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = torchrun_command(cfg_path, shard_dir, out, cfg.nproc, loss_csv)
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
        with contextlib.suppress(Exception):
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
    tracker.set_tag("pretrain_status", summary.get("status", "finished"))
    for key in ("loss_png", "loss_csv"):
        if summary.get(key):
            tracker.log_artifact(summary[key])

