"""The `Method` interface: everything a self-supervised objective gives the trainer.

The trainer (`ijepa.trainer`) owns data, augmentation, schedules, AdamW, checkpoints,
resume, DDP, logging and export; a method owns only what differs between objectives:

  make_masker        (class) the masks for a batch, built once and checked against the
                     data's patch grid before any work (ConfigError names the field)
  trained            the module that DDP wraps and the optimiser trains
  loss               one forward: (loss, features for the collapse signals)
  after_step         what happens after the optimiser step (I-JEPA: the EMA update)
  checkpoint_modules the modules a checkpoint holds, by state-dict key
  export_encoder     the encoder that is exported and probed
  Options            (class) a frozen dataclass for the method's own `method_options`

A method is one module under `ijepa.methods` plus an entry in `ijepa.methods.METHODS`.
The pretraining config is passed as-is (`ijepa.train_config.PretrainConfig`, not imported
here so that methods sit below the config in the import graph).
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn as nn

from ijepa.config import ConfigError, from_mapping
from ijepa.masks import Masks
from ijepa.models import ModelConfig, ViTEncoder

__all__ = ["Method", "Masker"]

# (batch_size, generator) -> Masks for the whole (global) batch
Masker = Callable[[int, "torch.Generator | None"], Masks]


class Method(ABC):
    name: ClassVar[str]
    title: ClassVar[str]  # for plots and logs, e.g. "I-JEPA"
    Options: ClassVar[type | None] = None  # dataclass for `method_options`; None = takes none

    # -- before any work ---------------------------------------------------------------
    @classmethod
    def options(cls, raw: Mapping[str, Any] | None) -> Any:
        """The typed `method_options` (ConfigError names the field)."""
        if cls.Options is None:
            if raw:
                raise ConfigError(f"method_options: method {cls.name!r} takes no options, got {sorted(raw)}")
            return None
        return from_mapping(cls.Options, raw or {}, "method_options")

    @classmethod
    @abstractmethod
    def make_masker(cls, cfg: Any, model: ModelConfig) -> Masker:
        """The batch masker for `model`'s patch grid; raises ConfigError when the config
        cannot be sampled on that grid."""

    # -- one run -----------------------------------------------------------------------
    def __init__(self, cfg: Any, model: ModelConfig, masker: Masker, device: torch.device):
        """Build the networks on `device` with the same initial weights on every rank (the
        caller seeds torch first) and set `self.trained`."""
        self.cfg = cfg
        self.model = model
        self.masker = masker
        self.device = device
        self.trained: nn.Module

    def masks(self, batch_size: int, generator: torch.Generator | None) -> Masks:
        return self.masker(batch_size, generator)

    @abstractmethod
    def loss(self, module: nn.Module, images: torch.Tensor, masks: Masks,
             autocast: contextlib.AbstractContextManager) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar loss, features [B, N, D] for the collapse signals). `module` is `trained`
        as the trainer runs it (DDP-wrapped and/or compiled)."""

    def after_step(self, momentum: float) -> None:
        """After the optimiser step; `momentum` is the EMA schedule's value for this step."""

    @abstractmethod
    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """Modules saved in (and restored from) checkpoints, by state-dict key."""

    @abstractmethod
    def export_encoder(self) -> ViTEncoder:
        """The encoder that is exported and evaluated."""

    def compile(self, backend: str = "inductor") -> None:
        """Compile forward passes the trainer does not wrap itself (``compile``)."""

    def derived(self) -> dict[str, Any]:
        """Run facts worth logging (parameter counts, visible patches, ...)."""
        return {}
