"""Typed pretraining configuration (`PretrainConfig`), checked before any work starts.

Build it with ``load_config(params)`` (unknown keys, wrong types and bad ranges raise
ConfigError naming the field). The encoder's `img_size` and `in_chans` are not parameters:
they come from the shard manifest, and `check_against_data` checks the image size against
the patch size and the method's masks against the patch grid before training.

`method` names an entry of `ijepa.methods.METHODS`; `method_options` is that method's own
section (e.g. MAE's mask ratio and decoder), typed and checked by the method.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping

from ijepa.config import ConfigError, as_dict, from_mapping, require
from ijepa.masks import MaskConfig
from ijepa.methods import METHODS, Masker, get_method
from ijepa.models import PRESETS, ModelConfig

__all__ = ["EncoderOverrides", "PredictorOverrides", "ModelSection", "OptimConfig", "AugmentConfig",
           "DataConfig", "CollapseConfig", "MonitorConfig", "PretrainConfig", "load_config", "resolve_model", "check_against_data",
           "model_and_masker", "RESUME_SAFE_FIELDS"]


@dataclass(frozen=True)
class EncoderOverrides:
    """Encoder fields to change from the preset (null = keep the preset's)."""

    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    drop_path: float | None = None
    norm_mean: tuple[float, ...] | None = None
    norm_std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class PredictorOverrides:
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    drop_path: float | None = None


@dataclass(frozen=True)
class ModelSection:
    """A preset (models.PRESETS) plus overrides; img_size / in_chans come from the shards."""

    preset: str = "tiny"
    patch_size: int | None = None  # null = the preset's
    encoder: EncoderOverrides = field(default_factory=EncoderOverrides)
    predictor: PredictorOverrides = field(default_factory=PredictorOverrides)
    # activation checkpointing of every transformer block (encoder, predictor, decoder): the
    # blocks' activations are recomputed in the backward pass, for memory at ViT-H/14 scale
    grad_checkpointing: bool = False

    def validate(self) -> None:
        require(self.preset in PRESETS, f"preset: unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        require(self.patch_size is None or self.patch_size > 0,
                f"patch_size must be positive, got {self.patch_size}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with per-iteration schedules. `batch_size` is GLOBAL: the images of one optimiser
    step, all processes and accumulation steps together. Each of `nproc` processes runs
    `accum_steps` forward/backward passes of batch_size / (nproc * accum_steps) images per
    optimiser step, so global batch = per-pass batch x accum_steps x nproc. Schedules, steps
    and checkpoints count optimiser steps."""

    batch_size: int = 64
    accum_steps: int = 1
    epochs: int = 10
    total_steps: int | None = None  # when set, replaces epochs * steps_per_epoch
    lr: float = 1e-3
    start_lr: float = 2e-4
    final_lr: float = 1e-6
    warmup_epochs: float = 1.0
    warmup_steps: int | None = None  # when set, replaces warmup_epochs
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    ema_momentum: float = 0.996
    final_ema_momentum: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = None  # max global grad norm; null = no clipping (paper)

    def validate(self) -> None:
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.accum_steps >= 1, f"accum_steps must be >= 1, got {self.accum_steps}")
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.total_steps is None or self.total_steps >= 1,
                f"total_steps must be >= 1 or null, got {self.total_steps}")
        for name in ("lr", "start_lr", "final_lr", "weight_decay", "final_weight_decay", "eps"):
            v = getattr(self, name)
            require(math.isfinite(v) and v >= 0, f"{name} must be a finite number >= 0, got {v}")
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        require(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        require(self.warmup_steps is None or self.warmup_steps >= 0,
                f"warmup_steps must be >= 0 or null, got {self.warmup_steps}")
        for name in ("ema_momentum", "final_ema_momentum"):
            v = getattr(self, name)
            require(0.0 <= v <= 1.0, f"{name} must be in [0, 1], got {v}")
        require(all(0.0 <= b < 1.0 for b in self.betas), f"betas must be in [0, 1), got {self.betas}")
        require(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be positive or null, got {self.grad_clip}")


@dataclass(frozen=True)
class AugmentConfig:
    """RandomResizedCrop to the same size: the paper's only augmentation."""

    enabled: bool = True
    scale: tuple[float, float] = (0.3, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def validate(self) -> None:
        require(0.0 < self.scale[0] <= self.scale[1] <= 1.0, f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        require(0.0 < self.ratio[0] <= self.ratio[1], f"ratio must satisfy 0 < min <= max, got {self.ratio}")


@dataclass(frozen=True)
class DataConfig:
    """How the train split is read (see ijepa.train_data).

    mode: "memory" decodes the split into RAM once (exact equal split across ranks, exact
    resume by index); "stream" reads the WebDataset shards (resampled + with_epoch);
    "auto" (default) = memory when the decoded split fits in `memory_limit_mb`, else stream.
    """

    mode: Literal["auto", "memory", "stream"] = "auto"
    memory_limit_mb: float = 2048.0
    shuffle_buffer: int = 1000  # stream mode: sample shuffle buffer per worker
    verify: bool = True  # check the train shards' sha256 against the manifest before training
    prefetch: int = 4  # steps (images + masks) each loader worker prepares ahead

    def validate(self) -> None:
        require(self.memory_limit_mb >= 0, f"memory_limit_mb must be >= 0, got {self.memory_limit_mb}")
        require(self.shuffle_buffer >= 1, f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        require(self.prefetch >= 1, f"prefetch must be >= 1, got {self.prefetch}")


@dataclass(frozen=True)
class CollapseConfig:
    """Warn (log + tracker tag) when a collapse signal of the target features drops below:

    std_min: per-dimension std over the batch of the average-pooled target features,
        averaged over dimensions; rank_min: effective rank (exp of the entropy of the
        normalised singular values) of those pooled features.
    """

    std_min: float = 1e-2
    rank_min: float = 1.5


@dataclass(frozen=True)
class MonitorConfig:
    """Probes along training (ijepa.trainer.probing): at every `every_checkpoints`-th checkpoint
    (and the last step) rank 0 scores the exported (target) encoder on the val split, never the
    test split: a weighted kNN top-1 (cosine, `knn_k`, `knn_temperature`; bank = `max_train`
    train images) and, with `linear`, the val top-1 of the probe stage's linear heads
    (ijepa.val_probe.ValProbe; head settings: `probe`, an ijepa.probes.ProbeConfig mapping).
    The monitored score (the one `export: best` follows) is linear_top1 when `linear`, else knn_top1."""

    enabled: bool = False
    every_checkpoints: int = 1
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear: bool = True
    max_train: int | None = 1000  # fixed random subset of the train split (seeded); null = all of it
    max_val: int | None = 500  # fixed random subset of the val split; null = all of it
    probe: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        require(self.every_checkpoints >= 1, f"monitor.every_checkpoints must be >= 1, got {self.every_checkpoints}")
        require(self.knn_k >= 1, f"monitor.knn_k must be >= 1, got {self.knn_k}")
        require(math.isfinite(self.knn_temperature) and self.knn_temperature > 0,
                f"monitor.knn_temperature must be a finite number > 0, got {self.knn_temperature}")
        for name in ("max_train", "max_val"):
            v = getattr(self, name)
            require(v is None or v >= 1, f"monitor.{name} must be >= 1 or null, got {v}")
        self.probe_config()

    def probe_config(self) -> Any:
        """The typed head settings (ijepa.probes.ProbeConfig, imported here only: a lazy import)."""
        from ijepa.probes import ProbeConfig

        return from_mapping(ProbeConfig, self.probe, "monitor.probe")

    @property
    def score_name(self) -> str:
        """The monitored score: what `export: best` maximises."""
        return "linear_top1" if self.linear else "knn_top1"


@dataclass(frozen=True)
class PretrainConfig:
    # a name in ijepa.methods.METHODS: "ijepa" (default) or "mae" (the MAE baseline)
    method: str = "ijepa"
    method_options: dict[str, Any] = field(default_factory=dict)  # the method's own section
    model: ModelSection = field(default_factory=ModelSection)
    masks: MaskConfig = field(default_factory=MaskConfig)
    optimisation: OptimConfig = field(default_factory=OptimConfig)
    loss: Literal["l2", "smooth_l1"] = "l2"
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # probes along training
    # which encoder is exported to <out>/encoder: "last" (the final step's) or "best" (the step
    # with the best monitored val score; needs monitor.enabled)
    export: Literal["last", "best"] = "last"
    # "auto": bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32
    # (ijepa.precision); "bf16" / "fp32" force one
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # "auto": torch.compile on CUDA, eager on CPU (compiling pays off only on long CPU runs);
    # true / false force it. Mask lengths vary per step: they are marked dynamic (no recompiles)
    compile: bool | Literal["auto"] = "auto"
    # nproc > 1: "ddp" replicates the trained modules; "fsdp" shards parameters, gradients and
    # optimiser state (torch FSDP2 fully_shard, per transformer block; the EMA target encoder
    # too): for vit_h14 and larger. Checkpoints hold full tensors either way.
    distributed: Literal["ddp", "fsdp"] = "ddp"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    # DataLoader workers per process that decode, crop and build masks (ijepa.train_input);
    # null = 0 for small images decoded in memory, else the process's cores minus one
    num_workers: int | None = None
    nproc: int = 1  # processes; > 1 launches torchrun --standalone --nproc_per_node nproc
    threads: int | None = None  # torch CPU threads per process; null = cores / nproc
    deterministic: bool = False
    progress: bool = True

    def validate(self) -> None:
        require(self.method in METHODS, f"method: unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        get_method(self.method).options(self.method_options)
        require(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        require(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")
        require(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        require(self.num_workers is None or self.num_workers >= 0,
                f"num_workers must be >= 0 or null, got {self.num_workers}")
        require(self.nproc >= 1, f"nproc must be >= 1, got {self.nproc}")
        require(self.threads is None or self.threads >= 1, f"threads must be >= 1 or null, got {self.threads}")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        require(self.export != "best" or self.monitor.enabled,
                "export: 'best' picks the checkpoint with the best val score, which needs probes along training: "
                "set monitor.enabled: true (or export: last)")
        o = self.optimisation
        require(o.batch_size % (self.nproc * o.accum_steps) == 0,
                f"optimisation.batch_size {o.batch_size} is not divisible by nproc {self.nproc} x "
                f"optimisation.accum_steps {o.accum_steps} (batch_size is the global batch, split evenly across "
                f"processes and accumulation steps)")

    def to_dict(self) -> dict:
        return as_dict(self)

    @property
    def options(self) -> Any:
        """The typed `method_options` of `method` (None when it takes none)."""
        return get_method(self.method).options(self.method_options)


def load_config(cfg: "PretrainConfig | Mapping[str, Any] | None") -> PretrainConfig:
    return from_mapping(PretrainConfig, cfg, "pretrain")


# Fields that may change between a checkpoint and its resume without making it wrong.
# accum_steps, grad_checkpointing and distributed change memory and summation order, not the run
# (same global batch, same data, full-tensor checkpoints either way).
RESUME_SAFE_FIELDS = frozenset({
    "checkpoint_every", "keep_last", "log_every", "export", "num_workers", "progress", "compile", "threads",
    "optimisation.accum_steps", "model.grad_checkpointing", "distributed",
    "collapse.std_min", "collapse.rank_min", "data.memory_limit_mb", "data.verify", "data.prefetch", "device", "deterministic",
})


def resolve_model(cfg: PretrainConfig, image_size: int, in_chans: int, source: str = "the shard manifest"
                  ) -> ModelConfig:
    """The ModelConfig for images of `image_size` x `image_size` with `in_chans` channels."""
    base = PRESETS[cfg.model.preset]
    patch = cfg.model.patch_size if cfg.model.patch_size is not None else base.encoder.patch_size
    if image_size % patch != 0:
        raise ConfigError(
            f"model.patch_size: image size {image_size} (from {source}) is not divisible by patch_size {patch}; "
            f"choose a patch size that divides {image_size}")
    enc_over = {k: v for k, v in as_dict(cfg.model.encoder).items() if v is not None}
    enc_over = {k: tuple(v) if isinstance(v, list) else v for k, v in enc_over.items()}
    pred_over = {k: v for k, v in as_dict(cfg.model.predictor).items() if v is not None}
    enc = replace(base.encoder, img_size=image_size, in_chans=in_chans, patch_size=patch, **enc_over)
    pred = replace(base.predictor, **pred_over)
    try:
        enc.validate()
    except ConfigError as err:
        raise ConfigError(f"model.encoder: {err}") from None
    try:
        pred.validate()
    except ConfigError as err:
        raise ConfigError(f"model.predictor: {err}") from None
    return ModelConfig(enc, pred)


def model_and_masker(cfg: PretrainConfig, image_size: int, in_chans: int, train_samples: int,
                     source: str = "the shard manifest") -> tuple[ModelConfig, Masker]:
    """Every check that needs the data (patch size, model shape, the method's masks on the
    patch grid, batch against split size); returns the model config and the batch masker,
    so that the masker is built once."""
    model = resolve_model(cfg, image_size, in_chans, source)
    masker = get_method(cfg.method).make_masker(cfg, model)
    require(train_samples >= cfg.optimisation.batch_size,
            f"optimisation.batch_size: {cfg.optimisation.batch_size} is larger than the train split "
            f"({train_samples} images in {source})")
    return model, masker


def check_against_data(cfg: PretrainConfig, image_size: int, in_chans: int, train_samples: int,
                       source: str = "the shard manifest") -> ModelConfig:
    """`model_and_masker` for callers that need only the check and the model config."""
    return model_and_masker(cfg, image_size, in_chans, train_samples, source)[0]
