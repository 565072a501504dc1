"""Val-split score of an encoder during a search (`ijepa.tune`): the same heads and head
selection as `ijepa.probes.run_probes`, reported on the val split; the test split is never read."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from ijepa import features as feats_mod
from ijepa.config import ConfigError, from_mapping
from ijepa.probes import ProbeConfig, ProbeError, fit_head, lowshot_indices, num_classes_of

__all__ = ["ValProbe", "val_score"]


class ValProbe:
    """Val-split score of an encoder, for hyper-parameter search; the test split is never read.

    The train and val splits are loaded once (optionally a fixed random subset of each:
    `max_train` / `max_val`, drawn with `cfg.seed`), so the score can be taken at every
    checkpoint of a run. `score(encoder)`: features of the encoder (not cached: it changes),
    then a head per weight decay of `cfg.weight_decays` fitted on train ("linear") or on the
    low-shot subsets of train ("lowshot", mean over `cfg.lowshot_seeds`), and the best val
    top-1 over the decays — the same head selection as `run_probes`, reported on val.
    """

    def __init__(self, cfg: ProbeConfig | Mapping[str, Any] | None, shard_dir: str | Path,
                 probe: Literal["linear", "lowshot"] = "linear", max_train: int | None = None,
                 max_val: int | None = None):
        self.cfg = from_mapping(ProbeConfig, cfg, "probe")
        if probe not in ("linear", "lowshot"):
            raise ConfigError(f"probe: the val score supports 'linear' or 'lowshot', got {probe!r}")
        self.probe = probe
        self.shard_dir = Path(shard_dir)
        from ijepa.data.reader import load_manifest, load_split

        manifest = load_manifest(self.shard_dir)
        splits = manifest.get("splits") or {}
        data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, cap in ((self.cfg.train_split, max_train), (self.cfg.val_split, max_val)):
            if name not in splits:
                raise ProbeError(f"split {name!r} not found in {self.shard_dir / 'manifest.json'} (has {sorted(splits)})")
            n = int(splits[name].get("samples", 0))
            keep = None
            if cap is not None and n > cap:  # the subset is drawn first, so only it is decoded
                keep = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed))[:cap]
                keep = torch.sort(keep).values.tolist()
            images, labels = load_split(self.shard_dir, name, labels=True, rows=keep)
            if "cls" not in labels:
                raise ProbeError(f"{self.shard_dir}: split {name!r} has no cls labels; the val score needs them")
            if images.shape[0] == 0:
                raise ProbeError(f"split {name!r} of {self.shard_dir} is empty")
            data[name] = (images, labels["cls"].long())
        self.train_images, self.train_y = data[self.cfg.train_split]
        self.val_images, self.val_y = data[self.cfg.val_split]
        self.n_classes = num_classes_of(manifest, "cls", [self.train_y, self.val_y])
        self.subsets = ([lowshot_indices(self.train_y, self.cfg.seed + i, self.cfg.lowshot_fraction,
                                         self.cfg.lowshot_per_class) for i in range(self.cfg.lowshot_seeds)]
                        if probe == "lowshot" else [])

    def features(self, encoder: torch.nn.Module, device: str | torch.device = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [N, D] of the train and val subsets (the probe stage's `n_last` pooling);
        leaves the encoder's train/eval mode as it was. ProbeError when they are not finite."""
        was_training = encoder.training
        try:
            kw = dict(n_last=self.cfg.n_last, batch_size=self.cfg.feature_batch_size, device=device, progress=False,
                      precision=self.cfg.precision)
            tx = feats_mod.extract_features(encoder, self.train_images, desc="val-score train", **kw)
            vx = feats_mod.extract_features(encoder, self.val_images, desc="val-score val", **kw)
        finally:
            encoder.train(was_training)
        if not (torch.isfinite(tx).all() and torch.isfinite(vx).all()):
            raise ProbeError("the encoder's features are not finite")
        return tx, vx

    def score_features(self, tx: torch.Tensor, vx: torch.Tensor) -> float:
        """Val top-1 (fraction) of the best head on features from `features`."""
        if self.probe == "linear":
            head = fit_head(self.cfg, tx, self.train_y, vx, self.val_y, self.n_classes)
            return float(max(head.val_top1.values()))
        accs = [max(fit_head(self.cfg, tx[idx], self.train_y[idx], vx, self.val_y, self.n_classes).val_top1.values())
                for idx in self.subsets]
        return float(sum(accs) / len(accs))

    def score(self, encoder: torch.nn.Module, device: str | torch.device = "cpu") -> float:
        """Val top-1 (fraction) of the best head; leaves the encoder's train/eval mode as it was."""
        return self.score_features(*self.features(encoder, device))


def val_score(encoder: torch.nn.Module, shard_dir: str | Path, cfg: ProbeConfig | Mapping[str, Any] | None = None,
              probe: Literal["linear", "lowshot"] = "linear", **kwargs: Any) -> float:
    """One-off `ValProbe(cfg, shard_dir, probe, **kwargs).score(encoder)`."""
    return ValProbe(cfg, shard_dir, probe, **kwargs).score(encoder)
