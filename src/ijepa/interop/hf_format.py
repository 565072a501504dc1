"""Hugging Face `transformers` I-JEPA folders (`IJepaModel.save_pretrained`, e.g. facebook/ijepa_vith14_1k).

A folder with `config.json` (`model_type: ijepa`) and `model.safetensors` (or a sharded
`model.safetensors.index.json`, or `pytorch_model.bin`). Two generations of names are read,
with or without the `ijepa.` prefix of `IJepaForImageClassification`:

    transformers 4 (the Hub's files)            transformers 5                 canonical
    embeddings.patch_embeddings.projection      (same)                         patch_embed.proj
    embeddings.position_embeddings              (same)                         pos_embed
    encoder.layer.{i}.layernorm_before          layers.{i}.layernorm_before    blocks.{i}.norm1
    ....attention.attention.{query,key,value}   ....attention.{q,k,v}_proj     blocks.{i}.attn.qkv (stacked)
    ....attention.output.dense                  ....attention.o_proj           blocks.{i}.attn.proj
    ....layernorm_after                         (same)                         blocks.{i}.norm2
    ....intermediate.dense / ....output.dense   ....mlp.fc1 / ....mlp.fc2      blocks.{i}.mlp.fc1 / fc2
    layernorm                                   (same)                         norm

Export writes the transformers 4 names, which both generations load (5 converts them on load,
as it does for the Hub's checkpoints). The model sees normalised pixels: the folder also gets
a `preprocessor_config.json` (ViTImageProcessor) with the encoder's mean and std.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ijepa import atomic
from ijepa.hashing import file_sha256
from ijepa.models import ViTEncoder

from .common import InteropError, canonical_state, load_safetensors, load_torch

__all__ = ["is_hf_folder", "read_hf", "write_hf", "hf_config"]

_RENAMES = [
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"embeddings\.position_embeddings$", "pos_embed"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.attention\.attention\.(query|key|value)\.", r"blocks.\1.attn.\2."),
    (r"layers\.(\d+)\.attention\.(q|k|v)_proj\.", r"blocks.\1.attn.\2."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"(?:encoder\.layer\.(\d+)\.intermediate\.dense|layers\.(\d+)\.mlp\.fc1)\.", r"blocks.\1\2.mlp.fc1."),
    (r"(?:encoder\.layer\.(\d+)\.output\.dense|layers\.(\d+)\.mlp\.fc2)\.", r"blocks.\1\2.mlp.fc2."),
    (r"layernorm\.", "norm."),
]
_QKV = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}
_UNUSED = ("pooler.", "classifier.", "embeddings.mask_token")  # not part of the encoder's features


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The folder's tensors and {file name: sha256} of the files they came from."""
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "model.safetensors.index.json").is_file():
        index = folder / "model.safetensors.index.json"
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise InteropError(f"{index}: not a safetensors index (weight_map): {err}") from None
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise InteropError(f"{index}: names weight files that are missing: {missing}")
    elif (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    else:
        raise InteropError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                           f"next to config.json (a Hugging Face save_pretrained folder)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        loaded = load_safetensors(f) if f.suffix == ".safetensors" else load_torch(f)
        if not isinstance(loaded, dict):
            raise InteropError(f"{f}: expected a state dict, got {type(loaded).__name__}")
        state.update(loaded)
    return state, {f.name: file_sha256(f) for f in files}


def read_hf(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(canonical state dict, shape hints for `encoder_config`, source info) of an HF I-JEPA folder."""
    cfg_path = folder / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InteropError(f"{cfg_path}: not readable JSON ({err})") from None
    if not isinstance(config, dict) or config.get("model_type") != "ijepa":
        got = config.get("model_type") if isinstance(config, dict) else config
        raise InteropError(f"{cfg_path}: model_type is {got!r}, expected 'ijepa' (a transformers IJepaModel)")
    if config.get("hidden_act", "gelu") != "gelu" or not config.get("qkv_bias", True):
        raise InteropError(f"{cfg_path}: hidden_act {config.get('hidden_act')!r} / qkv_bias "
                           f"{config.get('qkv_bias')!r}; the I-JEPA ViT has exact GELU and qkv biases")
    raw, files = _weights(folder)
    if any(k.startswith("ijepa.") for k in raw):  # IJepaForImageClassification: the backbone, not the classifier
        raw = {k[len("ijepa."):]: v for k, v in raw.items() if k.startswith("ijepa.")}
    state: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, list]] = {}
    unknown = []
    for name, tensor in raw.items():
        if name.startswith(_UNUSED):
            continue
        for pattern, repl in _RENAMES:
            if re.match(pattern, name):
                name = re.sub(pattern, repl, name, count=1)
                break
        else:
            unknown.append(name)
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.(query|key|value|q|k|v)\.(weight|bias)", name)
        if m:
            qkv.setdefault(int(m.group(1)), {}).setdefault(m.group(3), [None] * 3)[_QKV[m.group(2)]] = tensor
        else:
            state[name] = tensor
    if unknown:
        raise InteropError(f"{folder}: tensors that are not part of an I-JEPA ViT: {sorted(unknown)[:5]}")
    for i, parts in qkv.items():
        for kind, qkv_parts in parts.items():
            if any(t is None for t in qkv_parts):
                raise InteropError(f"{folder}: block {i} lacks one of its query/key/value {kind} tensors")
            state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv_parts, dim=0)
    hints = {"num_heads": config.get("num_attention_heads"), "norm_eps": float(config.get("layer_norm_eps", 1e-12))}
    info: dict[str, Any] = {"files": files}
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        try:
            proc = json.loads(pre.read_text())
            info["preprocessor"] = {"image_mean": proc.get("image_mean"), "image_std": proc.get("image_std")}
        except (OSError, json.JSONDecodeError, AttributeError):
            pass
    return state, hints, info


def hf_config(encoder: ViTEncoder) -> dict[str, Any]:
    cfg = encoder.cfg
    return {"architectures": ["IJepaModel"], "model_type": "ijepa", "hidden_size": cfg.embed_dim,
            "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
            "intermediate_size": int(cfg.embed_dim * cfg.mlp_ratio), "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
            "layer_norm_eps": cfg.norm_eps, "image_size": cfg.img_size, "patch_size": cfg.patch_size,
            "num_channels": cfg.in_chans, "qkv_bias": True, "torch_dtype": "float32"}


def write_hf(encoder: ViTEncoder, out: str | Path) -> dict[str, Any]:
    """Write `out/` (config.json, model.safetensors, preprocessor_config.json) that
    `transformers.IJepaModel.from_pretrained(out)` loads; returns the config."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InteropError(f"{out}: exists and is not a folder; --format hf writes a folder")
    state = canonical_state(encoder)
    hf: dict[str, torch.Tensor] = {
        "embeddings.patch_embeddings.projection.weight": state.pop("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.projection.bias": state.pop("patch_embed.proj.bias"),
        "embeddings.position_embeddings": state.pop("pos_embed"),
        "layernorm.weight": state.pop("norm.weight"), "layernorm.bias": state.pop("norm.bias")}
    parts = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for name, tensor in state.items():
        i, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", name).groups()
        part, kind = rest.rsplit(".", 1)
        if part == "attn.qkv":
            for which, chunk in zip(("query", "key", "value"), tensor.chunk(3, dim=0)):
                hf[f"encoder.layer.{i}.attention.attention.{which}.{kind}"] = chunk.contiguous()
        else:
            hf[f"encoder.layer.{i}.{parts[part]}.{kind}"] = tensor
    config = hf_config(encoder)
    out.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(out / "model.safetensors") as tmp:
        save_file(hf, str(tmp), metadata={"format": "pt"})
    cfg = encoder.cfg
    mean = list(cfg.norm_mean) * (cfg.in_chans if len(cfg.norm_mean) == 1 else 1)
    std = list(cfg.norm_std) * (cfg.in_chans if len(cfg.norm_std) == 1 else 1)
    atomic.write_json(out / "preprocessor_config.json", {
        "image_processor_type": "ViTImageProcessor", "do_resize": True,
        "size": {"height": cfg.img_size, "width": cfg.img_size}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean, "image_std": std})
    atomic.write_json(out / "config.json", config)
    return config
