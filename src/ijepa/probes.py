"""Downstream probes of a frozen, exported encoder: linear, attentive and kNN.

`run_probes(cfg, encoder_path, shard_dir, cache_dir)` runs, in one call and through the same
code for every model, three families of probes (rows of `metrics["probes"]`):

- linear heads on average-pooled features (the paper's evaluation):
  - `linear`: linear head on the `cls` label (ImageNet linear-probe analogue);
  - `lowshot`: the same head on a class-balanced subset of the train labels (ImageNet-1%
    analogue), several seeds, mean and std of test top-1;
  - `count` / `depth`: linear heads on the `count` and `depth` labels (Clevr/Count and
    Clevr/Dist analogues);
- `attentive_<label>` (cls, count, depth): an attentive probe on the last layer's patch tokens
  (`ijepa.attentive`: learned queries cross-attend to every token, as the JEPA family
  evaluates encoders), the epoch chosen on val top-1; it can use where things are, which mean
  pooling blurs;
- `knn_<label>`: weighted kNN top-1 on the pooled features (`ijepa.knn`: cosine, `knn.k`
  neighbours of the train split, `knn.temperature`): no training, a cheap monitor. The
  features are standardised per dimension with the train statistics first (as the linear
  heads' BatchNorm): mean-pooled LayerNorm outputs share a large common component that makes
  every cosine similarity near 1 (default scenes encoder, test top-1 raw / standardised: shape
  0.253 / 0.278, depth 0.233 / 0.280);

a probe whose label the dataset lacks is skipped, with the reason recorded;

for the I-JEPA encoder (`ijepa`) and the baselines `random_init` (same architecture,
initialised from `cfg.seed`) and `pixels` (raw pixels, see `ijepa.features.pixel_features`;
its attentive probe reads the image's patches as tokens, `ijepa.attentive.pixel_patch_tokens`,
with a sin-cos code of their grid position). Features: frozen encoder, average-pooled patch
features of the last layer or the last 4 layers concatenated (`ViTEncoder.features`); the
attentive probes' tokens come from the same forward pass; both cached on disk
(`ijepa.features`). Heads: `ijepa.linear` (BatchNorm without affine before the head by
default; weight decay picked on the val split); every family's top-1 is reported on the test
split.

Low-shot sampling (`ijepa.lowshot.lowshot_indices`): per class, `max(1, floor(fraction * n_c + 0.5))`
labels of the n_c train examples of that class, or exactly `lowshot_per_class`; drawn
without replacement by a torch.Generator seeded with `cfg.seed + i` for seed i, so each
seed is reproducible and the seeds differ; the same subsets are used for every model.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from ijepa import features as feats_mod
from ijepa.attentive import (AttentiveConfig, AttentiveResult, fit_attentive_probes, pixel_patch_tokens,
                             with_position_code)
from ijepa.config import ConfigError, as_dict, from_mapping, require
from ijepa.data.manifest import manifest_bytes, shard_root
from ijepa.export import EncoderFileError, _resolve, load_encoder, read_encoder_info
from ijepa.hashing import file_sha256
from ijepa.fit_progress import FitProgress
from ijepa.knn import knn_top1
from ijepa.lowshot import lowshot_counts, lowshot_indices
from ijepa.linear import LinearProbe, Normaliser, confusion_matrix, fit_linear_probe
from ijepa.models import EncoderConfig, ViTEncoder
from ijepa.probe_inputs import (ProbeError, check_encoder_matches_shards, check_splits, class_names_of, load_splits,
                                num_classes_of, shape_from_manifest)

__all__ = ["ProbeConfig", "KnnConfig", "ProbeError", "run_probes", "lowshot_indices", "lowshot_counts",
           "check_encoder_matches_shards", "PROBES", "LINEAR_PROBES", "ATTENTIVE_PROBES", "KNN_PROBES", "BASELINES",
           "LABEL_OF", "fit_head", "num_classes_of"]

log = logging.getLogger(__name__)

LABELS = ("cls", "count", "depth")
LINEAR_PROBES = ("linear", "lowshot", "count", "depth")
ATTENTIVE_PROBES = tuple(f"attentive_{label}" for label in LABELS)
KNN_PROBES = tuple(f"knn_{label}" for label in LABELS)
PROBES = LINEAR_PROBES + ATTENTIVE_PROBES + KNN_PROBES
BASELINES = ("random_init", "pixels")
LABEL_OF = {"linear": "cls", "lowshot": "cls", "count": "count", "depth": "depth",
            **{f"{family}_{label}": label for family in ("attentive", "knn") for label in LABELS}}

ProbeName = Literal["linear", "lowshot", "count", "depth", "attentive_cls", "attentive_count", "attentive_depth",
                    "knn_cls", "knn_count", "knn_depth"]
BaselineName = Literal["random_init", "pixels"]


@dataclass(frozen=True)
class KnnConfig:
    """kNN monitor parameters (`probe.*.knn`; ijepa.knn)."""

    k: int = 20                 # neighbours from the train split
    temperature: float = 0.07   # vote weight exp(cosine similarity / temperature)

    def validate(self) -> None:
        require(self.k >= 1, f"knn.k must be >= 1, got {self.k}")
        require(math.isfinite(self.temperature) and self.temperature > 0,
                f"knn.temperature must be positive, got {self.temperature}")



@dataclass(frozen=True)
class ProbeConfig:
    """Probe parameters (conf/base/parameters_probe.yml, key `probe`)."""

    n_last: int = 1                      # pooled features of the last layer (1) or last 4 layers concatenated (4)
    batchnorm: bool = True               # BatchNorm without affine before the linear head (paper)
    solver: Literal["lbfgs", "adam"] = "lbfgs"   # full-batch L-BFGS, or mini-batch Adam on the same objective
    max_iter: int = 100                  # L-BFGS iterations per weight decay (warm-started along the grid)
    epochs: int = 100                    # Adam epochs per weight decay
    lr: float = 1e-3                     # Adam learning rate (cosine schedule)
    batch_size: int = 1024               # Adam batch size
    weight_decays: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # grid, chosen on val top-1
    lowshot_fraction: float = 0.01       # labels per class = max(1, round(fraction * class count))
    lowshot_per_class: int | None = None # or exactly this many per class (overrides the fraction)
    lowshot_seeds: int = 3               # subsets drawn with seeds seed, seed+1, ...
    probes: tuple[ProbeName, ...] = PROBES   # rows to run: the linear, attentive_<label> and knn_<label> families
    attentive: AttentiveConfig = field(default_factory=AttentiveConfig)   # attentive probes (ijepa.attentive)
    knn: KnnConfig = field(default_factory=KnnConfig)
    baselines: tuple[BaselineName, ...] = BASELINES
    pixel_max_dim: int = 4096            # raw-pixel baseline average-pooled to at most this many dims
    feature_batch_size: int = 256
    # feature extraction and the attentive probes' token products; auto: bf16 where native (ijepa.precision)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    adapt_inputs: bool = True            # resize / replicate grey shard images to the encoder's input; false: refuse
    seed: int = 0                        # random-init baseline weights, low-shot subsets, Adam batch order
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"

    def validate(self) -> None:
        require(self.n_last in (1, 4), f"n_last must be 1 or 4, got {self.n_last}")
        require(self.max_iter >= 1, f"max_iter must be >= 1, got {self.max_iter}")
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(len(self.weight_decays) >= 1, "weight_decays must list at least one value")
        require(all(math.isfinite(v) and v >= 0 for v in self.weight_decays),
                f"weight_decays must be finite and >= 0, got {list(self.weight_decays)}")
        require(0.0 < self.lowshot_fraction <= 1.0, f"lowshot_fraction must be in (0, 1], got {self.lowshot_fraction}")
        require(self.lowshot_per_class is None or self.lowshot_per_class >= 1,
                f"lowshot_per_class must be >= 1 or null, got {self.lowshot_per_class}")
        require(self.lowshot_seeds >= 1, f"lowshot_seeds must be >= 1, got {self.lowshot_seeds}")
        require(len(self.probes) >= 1, "probes must list at least one of " + ", ".join(PROBES))
        require(len(set(self.probes)) == len(self.probes), f"probes has duplicates: {list(self.probes)}")
        require(len(set(self.baselines)) == len(self.baselines), f"baselines has duplicates: {list(self.baselines)}")
        require(self.pixel_max_dim >= 1, f"pixel_max_dim must be >= 1, got {self.pixel_max_dim}")
        require(self.feature_batch_size >= 1, f"feature_batch_size must be >= 1, got {self.feature_batch_size}")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        splits = (self.train_split, self.val_split, self.test_split)
        require(all(splits), f"split names must be non-empty, got {list(splits)}")
        require(len(set(splits)) == 3, f"train/val/test splits must differ, got {list(splits)}")


# ----------------------------------------------------------------------------- run


def fit_head(cfg: ProbeConfig, tx: torch.Tensor, ty: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor,
         n_classes: int) -> LinearProbe:
    return fit_linear_probe(tx, ty, vx, vy, n_classes, cfg.weight_decays, batchnorm=cfg.batchnorm,
                            solver=cfg.solver, max_iter=cfg.max_iter, epochs=cfg.epochs, lr=cfg.lr,
                            batch_size=cfg.batch_size, seed=cfg.seed)


# Cost of a unit of attentive / kNN work relative to a linear fit's (rows x dims); ETA weights only.
_ATTENTIVE_WORK = 0.01
_KNN_WORK = 0.05


def _sample_std(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).std(unbiased=True)) if len(values) > 1 else 0.0


def _random_encoder(enc_cfg: EncoderConfig, seed: int) -> ViTEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTEncoder(enc_cfg)
    return model.eval().requires_grad_(False)


def _pixel_tokens(images: torch.Tensor, enc_cfg: EncoderConfig, position_dim: int) -> torch.Tensor:
    """The raw-pixel baseline's tokens: the shard images cut into the encoder's patches (resized
    to the encoder's image size first when that patch size does not tile them), with a sin-cos
    code of each patch's grid position appended."""
    p = enc_cfg.patch_size
    if images.shape[-2] % p or images.shape[-1] % p:
        size = (enc_cfg.img_size, enc_cfg.img_size)
        images = torch.nn.functional.interpolate(images.float(), size=size, mode="bilinear", antialias=True)
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    return with_position_code(pixel_patch_tokens(images, p), grid, position_dim)


def _fit_work(cfg: ProbeConfig, probe: str, n_train: int, feats: torch.Tensor,
              toks: torch.Tensor | None, n_attentive: int = 1) -> float:
    """A fit's relative cost for the ETA: rows x dims for the linear heads; the attentive probes'
    rows x tokens x dims x epochs (shared by the labels trained together), scaled by the ratio of
    the fits' measured seconds."""
    if probe in ATTENTIVE_PROBES and toks is not None:
        return n_train * toks.shape[1] * toks.shape[2] * cfg.attentive.epochs * _ATTENTIVE_WORK / n_attentive
    if probe in KNN_PROBES:
        return n_train * feats.shape[1] * _KNN_WORK
    return n_train * feats.shape[1]


def run_probes(cfg: ProbeConfig | Mapping[str, Any] | None, encoder_path: str | Path, shard_dir: str | Path,
               cache_dir: str | Path, *, device: str = "cpu",
               progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the configured probes for the encoder and the baselines; see the module docstring.

    Returns `(metrics, extras)`. `metrics` (JSON-ready, accuracies as fractions)::

        {"encoder_sha256": str,
         "probes": {"linear": {"ijepa": a, "random_init": a, "pixels": a, "n_labels": int},
                    "lowshot": {"ijepa": mean, "ijepa_std": std, <baseline>, <baseline>_std, ...,
                                "n_labels": int, "seeds": int},
                    "count": {...as linear}, "depth": {...as linear},
                    "attentive_cls": {...as linear}, "attentive_count": ..., "attentive_depth": ...,
                    "knn_cls": {...as linear}, "knn_count": ..., "knn_depth": ...},
         "skipped": {"count": "dataset has no count labels", "attentive_count": ..., ...},
         "input_adaptation": {...}}   # only when the shard images were adapted (check_encoder_matches_shards)

    `extras`: {"confusion": [[int]] (ijepa linear probe on test, row = true class), "class_names":
    [str], "details": per probe and model its choices and seconds (linear: the chosen weight decay
    and val top-1 per decay, low-shot per seed; attentive: the chosen epoch, val top-1 per epoch,
    lr, weight decay, width, heads; knn: k, temperature), "feature_dims": {model: D},
    "token_shapes": {model: [T, D]} (attentive probes only), "seconds": {stage: s}};
    confusion/class_names are None when the linear probe did not run.

    Raises ConfigError (bad cfg), EncoderFileError (missing/corrupt encoder, names the path),
    ijepa.data.reader.ShardError (no/unreadable manifest, names the file), ProbeError (encoder and
    shards that cannot fit, naming both values; n_last > depth; missing or empty split).
    """
    cfg = from_mapping(ProbeConfig, cfg, "probe")
    shard_dir = shard_root(shard_dir)  # a folder or a URL (ijepa.data.location)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    # Encoder: readable, hash-checked, and of the shards' shape -- before any real work.
    weights, _ = _resolve(encoder_path)
    info = read_encoder_info(encoder_path)
    try:
        enc_cfg = from_mapping(EncoderConfig, info.get("encoder"), where=f"{encoder_path}: encoder")
    except ConfigError as err:
        raise EncoderFileError(str(err)) from None
    from ijepa.data.reader import load_manifest

    manifest = load_manifest(shard_dir)  # ShardError / ManifestMissingError naming the file
    check_encoder_matches_shards(enc_cfg, shape_from_manifest(manifest), encoder_path, shard_dir, cfg.adapt_inputs)
    if cfg.n_last > enc_cfg.depth:
        raise ProbeError(f"n_last={cfg.n_last} but encoder {encoder_path} has only depth {enc_cfg.depth}")
    order = (cfg.train_split, cfg.val_split, cfg.test_split)
    check_splits(manifest, shard_dir, order)
    encoder = load_encoder(encoder_path)
    sha = file_sha256(weights)

    splits = load_splits(shard_dir, order)
    fingerprint = hashlib.sha256(manifest_bytes(shard_dir)).hexdigest()
    for name, split in splits.items():  # the decoded images are authoritative
        adapt = check_encoder_matches_shards(enc_cfg, tuple(split.images.shape[1:]), encoder_path,
                                             f"{shard_dir} (split {name})", cfg.adapt_inputs)
    if adapt:  # the encoders (not the raw pixels) see resized / replicated images; cached apart
        fingerprint += f";input {adapt['from']}->{adapt['to']} {adapt['resize']}"
    wrap = (lambda m: feats_mod.AdaptedEncoder(m, enc_cfg.img_size, enc_cfg.in_chans)) if adapt else (lambda m: m)
    seconds["load"] = time.perf_counter() - t_start
    tr, va, te = order

    # Plan every probe -- labels present and valid, low-shot subsets drawn -- before any features.
    plans: dict[str, tuple[dict[str, torch.Tensor], int]] = {}
    skipped: dict[str, str] = {}
    for probe in cfg.probes:
        label = LABEL_OF[probe]
        if not all(label in splits[s].labels for s in order):
            skipped[probe] = f"dataset has no {label} labels"
            continue
        ys = {s: splits[s].labels[label] for s in order}
        for s in order:
            if ys[s].shape[0] != splits[s].images.shape[0]:
                raise ProbeError(f"split {s!r} of {shard_dir}: {ys[s].shape[0]} {label} labels "
                                 f"for {splits[s].images.shape[0]} images")
            if int(ys[s].min()) < 0:
                raise ProbeError(f"split {s!r} of {shard_dir}: negative {label} label {int(ys[s].min())}")
        plans[probe] = (ys, num_classes_of(manifest, label, [ys[s] for s in order]))
    seeds = [cfg.seed + i for i in range(cfg.lowshot_seeds)]
    subsets = ([lowshot_indices(plans["lowshot"][0][tr], s, cfg.lowshot_fraction, cfg.lowshot_per_class)
                for s in seeds] if "lowshot" in plans else [])
    want_tokens = any(p in ATTENTIVE_PROBES for p in plans)
    width = cfg.attentive.width_for(enc_cfg.embed_dim) if want_tokens else None  # ConfigError before work

    # Features (and tokens) per model and split (none when every probe was skipped).
    t0 = time.perf_counter()
    models: dict[str, tuple[torch.nn.Module | None, str | None]] = {"ijepa": (wrap(encoder), sha)}
    if "random_init" in cfg.baselines:
        rnd = _random_encoder(enc_cfg, cfg.seed)
        models["random_init"] = (wrap(rnd), "random_init-" + feats_mod.state_sha256(rnd))
    if "pixels" in cfg.baselines:
        models["pixels"] = (None, None)
    features: dict[str, dict[str, torch.Tensor]] = {}
    tokens: dict[str, dict[str, torch.Tensor]] = {}
    for model_name, (module, key) in (models.items() if plans else ()):
        features[model_name], tokens[model_name] = {}, {}
        for split_name in order:
            images = splits[split_name].images
            if module is None:
                features[model_name][split_name] = feats_mod.pixel_features(images, cfg.pixel_max_dim)
                if want_tokens:
                    tokens[model_name][split_name] = _pixel_tokens(images, enc_cfg, cfg.attentive.position_dim)
                continue
            out = feats_mod.encoder_features(
                module, key, images, split_name, n_last=cfg.n_last, cache_dir=cache_dir,
                data_fingerprint=fingerprint, batch_size=cfg.feature_batch_size, device=device,
                progress=progress, name=model_name, precision=cfg.precision, tokens=want_tokens)
            if want_tokens:
                features[model_name][split_name], tokens[model_name][split_name] = out
            else:
                features[model_name][split_name] = out
    seconds["features"] = time.perf_counter() - t0

    probes: dict[str, dict[str, Any]] = {}
    details: dict[str, Any] = {}
    attentive: dict[str, dict[str, AttentiveResult]] = {}
    confusion = class_names = None
    n_tr = {p: (int(subsets[0].numel()) * len(seeds) if p == "lowshot" else splits[tr].images.shape[0]) for p in plans}
    n_attentive = sum(p in ATTENTIVE_PROBES for p in plans)
    fits = FitProgress({(p, m): _fit_work(cfg, p, n_tr[p], features[m][tr], tokens[m].get(tr), n_attentive)
                        for p in plans for m in models}, progress)
    for probe, (ys, n_classes) in plans.items():
        t0 = time.perf_counter()
        row: dict[str, Any] = {}
        details[probe] = {}
        for model_name in models:
            f = features[model_name]
            t1 = time.perf_counter()
            if probe == "lowshot":
                accs, det = [], []
                for s, idx in zip(seeds, subsets):
                    head = fit_head(cfg, f[tr][idx], ys[tr][idx], f[va], ys[va], n_classes)
                    accs.append(head.top1(f[te], ys[te]))
                    det.append({"seed": s, "weight_decay": head.weight_decay, "test_top1": accs[-1],
                                "val_top1": {str(k): v for k, v in head.val_top1.items()}})
                row[model_name] = float(sum(accs) / len(accs))
                row[f"{model_name}_std"] = _sample_std(accs)
                details[probe][model_name] = {"seeds": det}
            elif probe in ATTENTIVE_PROBES:
                tok = tokens[model_name]
                if model_name not in attentive:  # every label's probe of this model in the same passes
                    attentive[model_name] = fit_attentive_probes(
                        cfg.attentive, tok[tr], tok[va], {p: (plans[p][0][tr], plans[p][0][va], plans[p][1])
                                                          for p in plans if p in ATTENTIVE_PROBES},
                        width=width, seed=cfg.seed, precision=cfg.precision)
                fitted = attentive[model_name][probe]
                row[model_name] = fitted.top1(tok[te], ys[te])
                details[probe][model_name] = fitted.details(cfg.attentive)
            elif probe in KNN_PROBES:
                norm = Normaliser.fit(f[tr])  # standardised as for the linear heads (module docstring)
                row[model_name] = knn_top1(norm(f[tr]), ys[tr], norm(f[te]), ys[te], k=cfg.knn.k,
                                           temperature=cfg.knn.temperature, n_classes=n_classes)
                details[probe][model_name] = {"k": cfg.knn.k, "temperature": cfg.knn.temperature}
            else:
                head = fit_head(cfg, f[tr], ys[tr], f[va], ys[va], n_classes)
                pred = head.predict(f[te])
                row[model_name] = float((pred == ys[te]).float().mean())
                details[probe][model_name] = {"weight_decay": head.weight_decay,
                                              "val_top1": {str(k): v for k, v in head.val_top1.items()}}
                if probe == "linear" and model_name == "ijepa":
                    confusion = confusion_matrix(pred, ys[te], n_classes).tolist()
                    class_names = class_names_of(manifest, "cls", n_classes)
            details[probe][model_name]["seconds"] = round(time.perf_counter() - t1, 3)
            fits.done(probe, model_name, time.perf_counter() - t1)
        if probe == "lowshot":
            row["n_labels"] = int(subsets[0].numel())
            row["seeds"] = len(seeds)
        else:
            row["n_labels"] = int(ys[tr].shape[0])
        probes[probe] = row
        seconds[probe] = time.perf_counter() - t0
        log.info("probe %s: %s", probe, row)

    fits.close()
    seconds["total"] = time.perf_counter() - t_start
    metrics = {"encoder_sha256": sha, "probes": probes, "skipped": skipped,
               **({"input_adaptation": adapt} if adapt else {})}
    extras = {"confusion": confusion, "class_names": class_names, "details": details,
              "feature_dims": {m: int(f[tr].shape[1]) for m, f in features.items()},
              **({"token_shapes": {m: list(t[tr].shape[1:]) for m, t in tokens.items()}} if want_tokens else {}),
              "config": as_dict(cfg), "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    return metrics, extras
