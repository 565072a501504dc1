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
from ijepa.attentive import AttentiveConfig, pixel_patch_tokens, with_position_code
from ijepa.config import ConfigError, as_dict, from_mapping, require
from ijepa.data.manifest import manifest_bytes, shard_root
from ijepa.export import EncoderFileError, _resolve, load_encoder, read_encoder_info
from ijepa.hashing import file_sha256
from ijepa.fit_progress import FitProgress
from ijepa.probe_fits import Fit, attentive_fn, default_workers, fit_fn, fit_head, run_fits, side_by_side
from ijepa.lowshot import lowshot_counts, lowshot_indices
from ijepa.linear import confusion_matrix
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
    fit_workers: int | None = None       # fits side by side, one torch thread each (ijepa.probe_fits); null: torch's threads
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
        require(self.fit_workers is None or self.fit_workers >= 1,
                f"fit_workers must be >= 1 or null, got {self.fit_workers}")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        splits = (self.train_split, self.val_split, self.test_split)
        require(all(splits), f"split names must be non-empty, got {list(splits)}")
        require(len(set(splits)) == 3, f"train/val/test splits must differ, got {list(splits)}")


# ----------------------------------------------------------------------------- run


# Cost of a unit of attentive / kNN work relative to a linear fit's (rows x dims); ETA weights only.
_ATTENTIVE_WORK = 0.01
_KNN_WORK = 0.05


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
    workers = cfg.fit_workers or default_workers()

    def model_inputs(module: torch.nn.Module | None, key: str | None, name: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for split_name in order:
            images = splits[split_name].images
            if module is None:
                out[split_name] = (feats_mod.pixel_features(images, cfg.pixel_max_dim),
                                   _pixel_tokens(images, enc_cfg, cfg.attentive.position_dim) if want_tokens else None)
                continue
            got = feats_mod.encoder_features(
                module, key, images, split_name, n_last=cfg.n_last, cache_dir=cache_dir,
                data_fingerprint=fingerprint, batch_size=cfg.feature_batch_size, device=device,
                progress=progress, name=name, precision=cfg.precision, tokens=want_tokens)
            out[split_name] = got if want_tokens else (got, None)
        return out

    # the encoders' passes side by side on a CPU, one torch thread each, as the fits below
    names = list(models) if plans else []
    calls = [lambda m=m: model_inputs(*models[m], m) for m in names]
    for i, got in side_by_side(calls, workers if str(device) == "cpu" else 1):
        features[names[i]] = {s: f for s, (f, _) in got.items()}
        tokens[names[i]] = {s: t for s, (_, t) in got.items() if t is not None}
    seconds["features"] = time.perf_counter() - t0

    details: dict[str, Any] = {probe: {} for probe in plans}
    n_tr = {p: (int(subsets[0].numel()) * len(seeds) if p == "lowshot" else splits[tr].images.shape[0]) for p in plans}
    attentive_probes = tuple(p for p in plans if p in ATTENTIVE_PROBES)
    work = {(p, m): _fit_work(cfg, p, n_tr[p], features[m][tr], tokens[m].get(tr), len(attentive_probes))
            for p in plans for m in models}
    fits = [Fit((p,), m, work[(p, m)],
                fit_fn(cfg, p, m, plans[p], features[m], order, seeds, subsets, knn=p in KNN_PROBES))
            for p in plans if p not in ATTENTIVE_PROBES for m in models]
    if attentive_probes:  # every label's probe of a model in the same passes over its tokens
        labels = {p: (plans[p][0][tr], plans[p][0][va], plans[p][1]) for p in attentive_probes}
        fits += [Fit(attentive_probes, m, sum(work[(p, m)] for p in attentive_probes),
                     attentive_fn(cfg, m, tokens[m], order, labels, {p: plans[p][0][te] for p in attentive_probes},
                                  width)) for m in models]
    t0 = time.perf_counter()
    progress_bar = FitProgress(work, progress)
    outcomes = run_fits(fits, workers, progress_bar)
    progress_bar.close()
    seconds["fits"] = time.perf_counter() - t0
    probes: dict[str, dict[str, Any]] = {}
    for probe, (ys, n_classes) in plans.items():
        row: dict[str, Any] = {}
        for model_name in models:
            outcome = outcomes[(probe, model_name)]
            row.update(outcome.values)
            details[probe][model_name] = outcome.detail
        row["n_labels"] = int(subsets[0].numel()) if probe == "lowshot" else int(ys[tr].shape[0])
        if probe == "lowshot":
            row["seeds"] = len(seeds)
        probes[probe] = row
        seconds[probe] = sum(outcomes[(probe, m)].detail["seconds"] for m in models)
        log.info("probe %s: %s", probe, row)
    confusion = class_names = None
    if "linear" in plans and outcomes[("linear", "ijepa")].pred is not None:
        n_classes = plans["linear"][1]
        confusion = confusion_matrix(outcomes[("linear", "ijepa")].pred, plans["linear"][0][te], n_classes).tolist()
        class_names = class_names_of(manifest, "cls", n_classes)
    seconds["total"] = time.perf_counter() - t_start
    metrics = {"encoder_sha256": sha, "probes": probes, "skipped": skipped,
               **({"input_adaptation": adapt} if adapt else {})}
    extras = {"confusion": confusion, "class_names": class_names, "details": details,
              "feature_dims": {m: int(f[tr].shape[1]) for m, f in features.items()},
              **({"token_shapes": {m: list(t[tr].shape[1:]) for m, t in tokens.items()}} if want_tokens else {}),
              "config": as_dict(cfg), "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    return metrics, extras
