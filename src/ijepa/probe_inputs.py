"""What the probes read besides the encoder: the shard manifest and splits, checked against the
encoder before any features are computed (`ijepa.probes.run_probes`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ijepa.features import AdaptedEncoder
from ijepa.models import EncoderConfig

__all__ = ["ProbeError", "Split", "shape_from_manifest", "check_encoder_matches_shards", "check_splits",
           "load_splits", "num_classes_of", "class_names_of"]


class ProbeError(ValueError):
    """Inputs of a probe run do not fit together (encoder vs shards, empty split, ...)."""


def shape_from_manifest(manifest: Mapping[str, Any]) -> tuple[int | None, int | None, int | None]:
    """(channels, height, width) recorded in a shard manifest (`image.{channels,height,width}`, else
    the top-level `channels` / `image_size`); None where not recorded."""
    image = manifest.get("image") if isinstance(manifest.get("image"), Mapping) else {}
    size = manifest.get("image_size")

    def num(*values: Any) -> int | None:
        return next((int(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)), None)

    return (num(image.get("channels"), manifest.get("channels")),
            num(image.get("height"), size), num(image.get("width"), size))


def check_encoder_matches_shards(enc: EncoderConfig, shape: tuple[int | None, int | None, int | None],
                                 encoder_path: Any, shard_dir: Any, adapt: bool = False) -> dict[str, Any] | None:
    """None when the encoder reads the shard images as they are; else, with `adapt`, how they are made
    to fit: {"from": [c, h, w], "to": [C, S, S], "resize": how or None, "replicate_channels": bool}.
    ProbeError naming both values for what cannot fit (size without `adapt`; channels but grey -> C)."""
    c, h, w = shape
    resize = h is not None and w is not None and (h, w) != (enc.img_size, enc.img_size)
    replicate = c is not None and c != enc.in_chans
    problems = []
    if resize and not adapt:
        grid, g = f"{h / enc.patch_size:g}x{w / enc.patch_size:g}", enc.img_size // enc.patch_size
        problems.append(f"image size {enc.img_size}x{enc.img_size} (patch grid {g}x{g} of {enc.patch_size}px "
                        f"patches) vs shard image size {h}x{w} (patch grid {grid})")
    if replicate and not (adapt and c == 1):
        problems.append(f"channels {enc.in_chans} vs shard channels {c}"
                        + (" (only grey shards are adapted, by replicating the channel)" if adapt else ""))
    if problems:
        raise ProbeError(f"encoder {encoder_path} does not fit the shards in {shard_dir}: " + "; ".join(problems))
    if not (resize or replicate):
        return None
    return {"from": [c, h, w], "to": [enc.in_chans, enc.img_size, enc.img_size],
            "resize": AdaptedEncoder.RESIZE if resize else None, "replicate_channels": replicate}


@dataclass
class Split:
    images: torch.Tensor          # uint8 [N, C, H, W]
    labels: dict[str, torch.Tensor]


def check_splits(manifest: Mapping[str, Any], shard_dir: Path, names: tuple[str, str, str]) -> None:
    """Every split the probes need (train, val, test `names`) is in the manifest and non-empty,
    checked before any loading."""
    splits = manifest.get("splits") or {}
    for name in names:
        if name not in splits:
            raise ProbeError(f"split {name!r} not found in {shard_dir / 'manifest.json'} (has {sorted(splits)})")
        n = splits[name].get("samples") if isinstance(splits[name], Mapping) else None
        if n is not None and int(n) == 0:
            raise ProbeError(f"split {name!r} of {shard_dir} is empty (0 samples); the probes need "
                             f"non-empty {'/'.join(names)} splits")


def load_splits(shard_dir: Path, names: tuple[str, ...]) -> dict[str, Split]:
    """Decoded images and labels of each split in `names` (ProbeError for a missing or empty one)."""
    from ijepa.data.reader import load_split

    splits = {}
    for name in names:
        try:
            images, labels = load_split(shard_dir, name, labels=True)
        except KeyError as err:
            raise ProbeError(f"split {name!r} not found in {shard_dir}: {err}") from None
        if images.ndim != 4 or images.shape[0] == 0:
            raise ProbeError(f"split {name!r} of {shard_dir} is empty (images {tuple(images.shape)})")
        splits[name] = Split(images, {k: torch.as_tensor(v).long() for k, v in (labels or {}).items()})
    return splits


def num_classes_of(manifest: Mapping[str, Any], label: str, values: list[torch.Tensor]) -> int:
    """The label schema's num_classes, or more if a value exceeds it."""
    seen = max(int(v.max()) for v in values) + 1
    entry = (manifest.get("labels") or {}).get(label) if isinstance(manifest.get("labels"), Mapping) else None
    declared = entry.get("num_classes") if isinstance(entry, Mapping) else None
    return max(seen, int(declared)) if isinstance(declared, int) and not isinstance(declared, bool) else seen


def class_names_of(manifest: Mapping[str, Any], label: str, n_classes: int) -> list[str]:
    """Names of the label's values from the manifest's label schema (`labels.<label>.names`),
    else '0', '1', ..."""
    schema = manifest.get("labels")
    entry = schema.get(label) if isinstance(schema, Mapping) else None
    names = entry.get("names") if isinstance(entry, Mapping) else None
    if isinstance(names, (list, tuple)) and len(names) >= n_classes and all(isinstance(x, str) for x in names):
        return list(names)[:n_classes]
    return [str(i) for i in range(n_classes)]
