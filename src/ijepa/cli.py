"""`ijepa import SRC OUT_DIR` and `ijepa export ENCODER_DIR OUT --format timm|hf` (also `python -m ijepa`).

import: a reference checkpoint (.pth.tar), a timm I-JEPA state dict (.pth / .safetensors) or a
Hugging Face I-JEPA folder -> an exported encoder folder (what `ijepa.load_encoder` and the
probe pipeline's `probe.encoder_path` take). export: an exported encoder folder -> a timm
checkpoint or a Hugging Face folder. See `ijepa.interop`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

__all__ = ["main"]


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ijepa", description="Bring I-JEPA encoders in, take ours out.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="a released / timm / Hugging Face I-JEPA encoder -> an exported encoder folder",
                         description="Write SRC's encoder as OUT_DIR/encoder.safetensors + encoder.json.")
    imp.add_argument("src", metavar="SRC", help="reference .pth.tar, timm .pth/.safetensors, or Hugging Face folder")
    imp.add_argument("out_dir", metavar="OUT_DIR")
    imp.add_argument("--format", dest="fmt", default="auto", choices=["auto", "official", "timm", "hf"],
                     help="layout of SRC (default: told from its content)")
    imp.add_argument("--which", default="target_encoder", choices=["target_encoder", "encoder"],
                     help="reference checkpoints: the EMA target encoder (default, as the paper evaluates) "
                          "or the context encoder")
    imp.add_argument("--num-heads", type=int, help="attention heads (needed when the width is not a standard ViT's)")
    imp.add_argument("--mean", type=_floats, help="normalisation mean, comma-separated (default ImageNet's)")
    imp.add_argument("--std", type=_floats, help="normalisation std, comma-separated (default ImageNet's)")
    imp.add_argument("--trust-pickle", action="store_true",
                     help="load a checkpoint that weights_only=True refuses (runs its pickled code: trusted files only)")
    imp.add_argument("--force", action="store_true", help="overwrite an encoder already in OUT_DIR")
    exp = sub.add_parser("export", help="an exported encoder folder -> a timm checkpoint or a Hugging Face folder")
    exp.add_argument("encoder_dir", metavar="ENCODER_DIR")
    exp.add_argument("out", metavar="OUT", help="timm: a file (.safetensors, else torch.save); hf: a folder")
    exp.add_argument("--format", dest="fmt", required=True, choices=["timm", "hf"])
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ijepa.interop import InteropError, export_encoder, import_encoder

    try:
        if args.cmd == "import":
            out = import_encoder(args.src, args.out_dir, fmt=args.fmt, which=args.which, num_heads=args.num_heads,
                                 mean=args.mean, std=args.std, trust_pickle=args.trust_pickle, overwrite=args.force)
            from ijepa.export import read_encoder_info

            info = read_encoder_info(out)
            print(json.dumps({"encoder": str(out), "config": info["encoder"], "source": info["metadata"]["source"]},
                             indent=2))
            print(f"probe it: kedro run --pipeline probe --params \"dataset=<dataset>,probe.encoder_path={out}\"")
        else:
            info = export_encoder(args.encoder_dir, args.out, args.fmt)
            if args.fmt == "timm":
                print(f"wrote {args.out} and {args.out}.json; load it with:\n  {info['python']}")
            else:
                print(f"wrote {args.out}/ (config.json, model.safetensors, preprocessor_config.json); load it with:\n"
                      f"  import transformers; model = transformers.IJepaModel.from_pretrained({str(args.out)!r})")
    except InteropError as err:
        print(f"ijepa {args.cmd}: error: {err}", file=sys.stderr)
        return 2
    return 0
