"""Which layout a file or folder is in, read into the canonical state dict.

The layout is told from the content, not the name: a folder with `config.json` is a Hugging
Face folder; a `.safetensors` file is a timm state dict (or HF weights, when its names say so
and a config.json lies next to it); any other file is loaded with `torch.load(weights_only=True)`
and is a reference checkpoint when it holds `target_encoder` / `encoder` state dicts, else a
timm state dict.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ijepa.hashing import file_sha256

from .common import EXPECTED, InteropError, load_safetensors, load_torch
from .hf_format import is_hf_folder, read_hf
from .official import is_official, read_official
from .timm_format import read_timm

__all__ = ["FORMATS", "Source", "read_source"]

Format = Literal["auto", "official", "timm", "hf"]
FORMATS = ("auto", "official", "timm", "hf")


@dataclass
class Source:
    """A read source: canonical tensors, what the format says about the shapes, and provenance."""

    format: str
    state: dict[str, torch.Tensor]
    hints: dict[str, Any] = field(default_factory=dict)   # num_heads / norm_eps when the format states them
    info: dict[str, Any] = field(default_factory=dict)    # provenance for encoder.json (sha256, which, ...)


def read_source(src: str | Path, fmt: Format = "auto", which: str = "target_encoder",
                trust_pickle: bool = False) -> Source:
    path = Path(src)
    if fmt not in FORMATS:
        raise InteropError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    if not path.exists():
        raise InteropError(f"{path}: no such file or folder; expected {EXPECTED}")
    if path.is_dir():
        if (path / "encoder.json").is_file():
            raise InteropError(f"{path}: already an exported encoder folder (ijepa.load_encoder reads it as it is)")
        if not is_hf_folder(path) or fmt not in ("auto", "hf"):
            raise InteropError(f"{path}: a folder, but not a Hugging Face I-JEPA folder (config.json + "
                               f"model.safetensors){'' if fmt in ('auto', 'hf') else f' as --format {fmt} needs a file'}")
        state, hints, info = read_hf(path)
        return Source("hf", state, hints, {**info, "sha256": _main_sha(info["files"])})
    if fmt == "hf":
        if is_hf_folder(path.parent) and path.name in ("model.safetensors", "pytorch_model.bin", "config.json"):
            return read_source(path.parent, "hf")
        raise InteropError(f"{path}: --format hf takes the folder save_pretrained wrote (config.json + model.safetensors)")
    sha = file_sha256(path)
    if path.suffix == ".safetensors":
        state = load_safetensors(path)
        if any(k.startswith(("embeddings.", "ijepa.embeddings.")) for k in state):
            if is_hf_folder(path.parent) and fmt == "auto":
                return read_source(path.parent, "hf")
            raise InteropError(f"{path}: Hugging Face names (embeddings.*) but no config.json next to it; "
                               f"pass the folder save_pretrained wrote")
        if fmt == "official":
            raise InteropError(f"{path}: a safetensors file holds one state dict, not a reference checkpoint "
                               f"(torch.save of a dict with 'target_encoder', 'encoder', ...)")
        state, info = read_timm(state, str(path))
        return Source("timm", state, _sidecar_hints(path), {**info, "sha256": sha})
    obj = load_torch(path, trust_pickle)
    if fmt in ("auto", "official") and is_official(obj):
        state, info = read_official(obj, which, str(path))
        return Source("official", state, {}, {**info, "sha256": sha})
    if fmt == "official":
        keys = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        raise InteropError(f"{path}: not a reference checkpoint: no 'target_encoder' or 'encoder' state dict "
                           f"(found {keys})")
    state, info = read_timm(obj, str(path))
    return Source("timm", state, _sidecar_hints(path), {**info, "sha256": sha})


def _sidecar_hints(path: Path) -> dict[str, Any]:
    """What `ijepa export --format timm` wrote next to the checkpoint (`<file>.json`): heads, eps,
    mean and std, which the state dict cannot tell; {} without one."""
    side = Path(f"{path}.json")
    try:
        spec = json.loads(side.read_text()) if side.is_file() else {}
        overlay, kwargs = spec.get("pretrained_cfg_overlay") or {}, spec.get("kwargs") or {}
        hints = {"num_heads": kwargs.get("num_heads"), "norm_eps": spec.get("norm_eps"),
                 "mean": overlay.get("mean"), "std": overlay.get("std")}
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    return {k: v for k, v in hints.items() if v is not None}


def _main_sha(files: dict[str, str]) -> str:
    """The sha256 of the weights file (of the sorted list of shards' sha256 when sharded)."""
    if len(files) == 1:
        return next(iter(files.values()))
    import hashlib

    return hashlib.sha256("\n".join(f"{k} {v}" for k, v in sorted(files.items())).encode()).hexdigest()
