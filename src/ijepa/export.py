"""Exported target encoder: `encoder.safetensors` + `encoder.json` (config and metadata).

`load_encoder(path)` rebuilds the ViT in one call; the probes and users load it this way.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ijepa import atomic
from ijepa.config import ConfigError, as_dict, from_mapping
from ijepa.hashing import file_sha256  # re-exported: the trainer and pipelines import it from here
from ijepa.models import EncoderConfig, ViTEncoder

WEIGHTS = "encoder.safetensors"
CONFIG = "encoder.json"
# EncoderConfig fields only imported encoders set: left out of encoder.json at their defaults,
# so our own encoders' files read as before (and by code that predates the fields).
_OMIT_AT_DEFAULT = {"pos_embed": "sincos", "norm_eps": 1e-5}


class EncoderFileError(RuntimeError):
    """An exported encoder is missing, unreadable or inconsistent."""


def save_encoder(encoder: ViTEncoder, out_dir: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write weights then config atomically into `out_dir`; returns the weights path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    with atomic.atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    enc = {k: v for k, v in as_dict(encoder.cfg).items() if not (k in _OMIT_AT_DEFAULT and _OMIT_AT_DEFAULT[k] == v)}
    info = {"format": "ijepa-encoder/1", "encoder": enc,
            "sha256": file_sha256(out / WEIGHTS), "metadata": metadata or {}}
    atomic.write_json(out / CONFIG, info)
    return out / WEIGHTS


def _resolve(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        return p / WEIGHTS, p / CONFIG
    if p.suffix == ".safetensors":
        return p, p.with_name(CONFIG)
    if p.suffix == ".json":
        return p.with_name(WEIGHTS), p
    return p, p.with_name(CONFIG)


def read_encoder_info(path: str | Path) -> dict[str, Any]:
    """The JSON config of an exported encoder (no weights loaded)."""
    weights, config = _resolve(path)
    if not config.is_file():
        raise EncoderFileError(f"encoder config not found: {config} (expected next to {weights})")
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise EncoderFileError(f"encoder config {config} is not valid JSON: {err}") from None


def load_encoder(path: str | Path, map_location: str = "cpu", check_hash: bool = True) -> ViTEncoder:
    """Rebuild an exported encoder, in eval mode with gradients off."""
    weights, _ = _resolve(path)
    if not weights.is_file():
        raise EncoderFileError(f"encoder weights not found: {weights}")
    info = read_encoder_info(path)
    try:
        cfg = from_mapping(EncoderConfig, info.get("encoder"), where=f"{weights.parent / CONFIG}: encoder")
    except ConfigError as err:
        raise EncoderFileError(str(err)) from None
    if check_hash and info.get("sha256") and file_sha256(weights) != info["sha256"]:
        raise EncoderFileError(f"encoder weights {weights} do not match the sha256 in its config (corrupted?)")
    try:
        state = load_file(str(weights), device=map_location)
    except (SafetensorError, OSError, ValueError) as err:
        raise EncoderFileError(f"cannot read encoder weights {weights}: {err}") from None
    model = ViTEncoder(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EncoderFileError(f"encoder weights {weights} do not fit its config: "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(map_location).eval().requires_grad_(False)
    return model
