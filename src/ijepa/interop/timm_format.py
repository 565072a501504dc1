"""timm's I-JEPA ViTs: `vit_huge_patch14_gap_224.in1k_ijepa` and friends.

timm builds them with `class_token=False, global_pool='avg', fc_norm=False` (no class token;
the final norm before average pooling), LayerNorm eps 1e-6 and a learned `pos_embed`
[1, N, D] that holds the reference code's table. Their state dict uses the canonical names
(`ijepa.interop.common`), plus `head.*` when built with a classifier.

Export (`write_timm`) writes such a state dict (`.safetensors`, or `torch.save` for any other
suffix) and, next to it, `<file>.json` with the exact `timm.create_model` call (`timm_spec`):
the I-JEPA model name when the shape is one of the released ones, else a ViT name with every
shape given as keyword arguments. `pretrained_cfg_overlay` carries `num_classes=0` (so timm
loads strictly, never silently skipping a tensor), the input size and the mean/std.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ijepa import atomic
from ijepa.models import EncoderConfig, ViTEncoder

from .common import InteropError, canonical_state, strip_prefix, tensors

__all__ = ["IJEPA_MODELS", "read_timm", "timm_spec", "timm_kwargs", "timm_call", "write_timm", "create_model"]

# (patch, width, depth, heads, mlp width, image size) -> timm's name of the released I-JEPA encoder
IJEPA_MODELS = {
    (14, 1280, 32, 16, 5120, 224): "vit_huge_patch14_gap_224",   # .in1k_ijepa, .in22k_ijepa
    (16, 1280, 32, 16, 5120, 448): "vit_huge_patch16_gap_448",   # .in1k_ijepa
    (16, 1408, 40, 16, 6144, 224): "vit_giant_patch16_gap_224",  # .in22k_ijepa
}
_BY_WIDTH = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
             1024: "vit_large_patch16_224", 1280: "vit_huge_patch14_224"}
_TIMM_EPS = 1e-6  # timm's ViT LayerNorm eps


def read_timm(obj: Any, where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The canonical state dict of a timm ViT state dict (unwrapped from 'model' / 'state_dict'
    as timm's checkpoint_filter_fn does); a classifier head is dropped and recorded."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
    state = strip_prefix(tensors(obj, where), "module.")
    head = sorted(k for k in state if k.startswith("head."))
    for k in head:
        del state[k]
    return state, ({"dropped": head} if head else {})


def _mlp_width(cfg: EncoderConfig) -> int:
    return int(cfg.embed_dim * cfg.mlp_ratio)


def timm_spec(cfg: EncoderConfig) -> dict[str, Any]:
    """JSON-ready description of the timm model that holds an encoder of `cfg`: model_name,
    kwargs (besides num_classes=0), norm_eps, pretrained_cfg_overlay (without `file`)."""
    key = (cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, _mlp_width(cfg), cfg.img_size)
    name = IJEPA_MODELS.get(key) if cfg.in_chans == 3 else None
    kwargs: dict[str, Any] = {}
    if name is None:
        name = _BY_WIDTH.get(cfg.embed_dim, "vit_base_patch16_224")
        kwargs = {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_chans,
                  "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
                  "mlp_ratio": cfg.mlp_ratio, "class_token": False, "global_pool": "avg", "fc_norm": False}
    mean = list(cfg.norm_mean) * (cfg.in_chans if len(cfg.norm_mean) == 1 else 1)
    std = list(cfg.norm_std) * (cfg.in_chans if len(cfg.norm_std) == 1 else 1)
    overlay = {"num_classes": 0, "input_size": [cfg.in_chans, cfg.img_size, cfg.img_size], "mean": mean, "std": std}
    return {"model_name": name, "kwargs": kwargs, "norm_eps": cfg.norm_eps, "pretrained_cfg_overlay": overlay}


def timm_kwargs(spec: Mapping[str, Any], file: str | Path) -> dict[str, Any]:
    """Keyword arguments of `timm.create_model(spec['model_name'], **kwargs)` for the checkpoint `file`."""
    import functools

    overlay = dict(spec["pretrained_cfg_overlay"], file=str(file))
    overlay["input_size"] = tuple(overlay["input_size"])
    overlay["mean"], overlay["std"] = tuple(overlay["mean"]), tuple(overlay["std"])
    kwargs = dict(spec["kwargs"], pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    if spec["norm_eps"] != _TIMM_EPS:
        kwargs["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=spec["norm_eps"])
    return kwargs


def timm_call(spec: Mapping[str, Any], file: str | Path) -> str:
    """The Python line that loads the checkpoint in timm (written next to it, printed by the CLI)."""
    overlay = dict(spec["pretrained_cfg_overlay"], file=str(file))
    parts = [repr(spec["model_name"]), "pretrained=True", "num_classes=0",
             "pretrained_cfg_overlay=dict(" + ", ".join(f"{k}={_py(v)}" for k, v in overlay.items()) + ")"]
    parts += [f"{k}={_py(v)}" for k, v in spec["kwargs"].items()]
    if spec["norm_eps"] != _TIMM_EPS:
        parts.append(f"norm_layer=functools.partial(torch.nn.LayerNorm, eps={spec['norm_eps']!r})")
    head = "import functools, timm, torch; " if spec["norm_eps"] != _TIMM_EPS else "import timm; "
    return head + "model = timm.create_model(" + ", ".join(parts) + ")"


def _py(v: Any) -> str:
    return repr(tuple(v)) if isinstance(v, list) else repr(v)


def write_timm(encoder: ViTEncoder, out: str | Path) -> dict[str, Any]:
    """Write the timm checkpoint `out` and `<out>.json` (spec + Python call); returns the latter."""
    out = Path(out)
    if out.is_dir():
        raise InteropError(f"{out}: is a folder; --format timm writes one checkpoint file (e.g. {out / 'model.safetensors'})")
    state = canonical_state(encoder)
    with atomic.atomic_path(out) as tmp:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(state, tmp)
    spec = timm_spec(encoder.cfg)
    info = dict(spec, file=out.name, python=timm_call(spec, out))
    atomic.write_json(Path(f"{out}.json"), info)
    return info


def create_model(checkpoint: str | Path, **overrides: Any) -> torch.nn.Module:
    """Load a checkpoint written by `write_timm` in timm, from the `<checkpoint>.json` next to it."""
    import timm

    spec = json.loads(Path(f"{checkpoint}.json").read_text())
    kwargs = timm_kwargs(spec, checkpoint)
    kwargs.update(overrides)
    return timm.create_model(spec["model_name"], **kwargs)

