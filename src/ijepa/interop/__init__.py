"""Encoders in and out: released I-JEPA checkpoints into our encoder folder, ours out to timm / HF.

    import_encoder(src, out_dir)              reference .pth.tar | timm state dict | HF folder
                                              -> out_dir/encoder.safetensors + encoder.json
    export_encoder(encoder_dir, out, "timm")  -> a timm checkpoint (+ <out>.json: the create_model call)
    export_encoder(encoder_dir, out, "hf")    -> a folder IJepaModel.from_pretrained reads

Shapes come from the weights (`common.encoder_config`), the positional table is the stored
one (`pos_embed: stored`), LayerNorm eps 1e-6 (HF: its config's), images normalised with
ImageNet's mean and std unless told otherwise. Everything is read and checked before anything
is written: a bad source leaves `out_dir` untouched. The command line is `ijepa.cli`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from .common import InteropError, build_encoder, check_blocks, encoder_config
from .detect import FORMATS, Source, read_source

__all__ = ["InteropError", "import_encoder", "export_encoder", "read_source", "Source", "FORMATS",
           "EXPORT_FORMATS"]

log = logging.getLogger(__name__)
EXPORT_FORMATS = ("timm", "hf")


def import_encoder(src: str | Path, out_dir: str | Path, *, fmt: str = "auto", which: str = "target_encoder",
                   num_heads: int | None = None, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, trust_pickle: bool = False,
                   overwrite: bool = False) -> Path:
    """Write the encoder of `src` as an exported encoder folder `out_dir`; returns `out_dir`.

    `which`: "target_encoder" (default, what the paper evaluates) or "encoder" (the context
    encoder) of a reference checkpoint. `num_heads`: when the width is not a known ViT width
    (`common.KNOWN_HEADS`). `mean` / `std`: the images' normalisation, ImageNet's by default.
    Raises InteropError naming the file and what was expected.
    """
    from ijepa import __version__
    from ijepa.export import CONFIG, WEIGHTS, save_encoder

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InteropError(f"{out}: exists and is not a folder")
    if not overwrite and ((out / WEIGHTS).exists() or (out / CONFIG).exists()):
        raise InteropError(f"{out}: already holds an encoder; choose another folder or overwrite it (--force)")
    source = read_source(src, fmt, which, trust_pickle)  # type: ignore[arg-type]
    where = str(src)
    heads = num_heads or source.hints.get("num_heads")
    eps = source.hints.get("norm_eps", 1e-6)
    mean, std = mean or source.hints.get("mean"), std or source.hints.get("std")
    cfg = encoder_config(source.state, where, num_heads=heads, norm_eps=eps, mean=tuple(mean or ()) or None,
                         std=tuple(std or ()) or None)
    check_blocks(source.state, cfg.depth, where)
    encoder = build_encoder(cfg, source.state, where)
    _warn_preprocessor(source, cfg, where)
    provenance = {"format": source.format, "path": str(src), "file": Path(src).name, **source.info}
    if source.format != "official":
        provenance.pop("which", None)
    save_encoder(encoder, out, metadata={"source": provenance, "imported_by": f"ijepa {__version__}"})
    log.info("imported %s (%s) -> %s", src, source.format, out)
    return out


def _warn_preprocessor(source: Source, cfg: Any, where: str) -> None:
    pre = source.info.get("preprocessor") or {}
    if pre.get("image_mean") and [round(v, 3) for v in pre["image_mean"]] != [round(v, 3) for v in cfg.norm_mean]:
        log.warning("%s: preprocessor_config.json normalises with mean %s / std %s; the encoder is imported with "
                    "mean %s / std %s (the reference code's ImageNet values; --mean/--std to change)", where,
                    pre.get("image_mean"), pre.get("image_std"), list(cfg.norm_mean), list(cfg.norm_std))


def export_encoder(encoder_dir: str | Path, out: str | Path, fmt: str) -> dict[str, Any]:
    """Write the exported encoder `encoder_dir` as a timm checkpoint or a Hugging Face folder.

    Returns, for timm, the `<out>.json` written next to the checkpoint (model name, kwargs, the
    Python line that loads it); for hf, the config.json written.
    """
    from ijepa.export import EncoderFileError, load_encoder

    if fmt not in EXPORT_FORMATS:
        raise InteropError(f"--format must be one of {list(EXPORT_FORMATS)}, got {fmt!r}")
    try:
        encoder = load_encoder(encoder_dir)
    except EncoderFileError as err:
        raise InteropError(str(err)) from None
    if fmt == "timm":
        from .timm_format import write_timm

        return write_timm(encoder, out)
    from .hf_format import write_hf

    return write_hf(encoder, out)

