"""Encoders in and out (ijepa.interop, ijepa.cli): equivalence with timm and transformers, token by token.

Random small models built by each library, saved in its layout (and a timm model's weights
wrapped as the reference code saves them), imported, and compared with the source library's
own forward on the same images: max abs difference <= 1e-5 in fp32. Exports reloaded in timm
and transformers give the same outputs. Bad files: clear errors, nothing written.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ijepa
from conftest import tiny_encoder_config
from ijepa.export import file_sha256, read_encoder_info, save_encoder
from ijepa.interop import InteropError, export_encoder, import_encoder
from ijepa.interop.timm_format import timm_kwargs
from ijepa.models import ViTEncoder, _sincos

timm = pytest.importorskip("timm")

TOL = 1e-5
# timm's I-JEPA ViT-H/14 entry point with every I-JEPA option (no class token, avg pool, norm
# before pooling, eps 1e-6), only the shape made small; width 64 is no standard ViT's: heads given.
SHAPE = dict(img_size=28, patch_size=7, embed_dim=64, depth=2, num_heads=4)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _timm_vit(seed: int, **shape) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_huge_patch14_gap_224", pretrained=False, num_classes=0,
                             **{**SHAPE, **shape}).eval()


def _transformers():
    """transformers is a test-only requirement (requirements-test.txt): only its tests skip without it."""
    return pytest.importorskip("transformers")


def _images(n: int = 3, size: int = 28, chans: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, chans, size, size, generator=torch.Generator().manual_seed(seed))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def _timm_tokens(model, x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features((x - mean) / std)


def _ours(path: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ijepa.load_encoder(path)(x)


def _mae_sincos(dim: int, grid: int) -> torch.Tensor:
    """The reference code's table (MAE's get_2d_sincos_pos_embed): two halves, each
    concat(sin, cos) of one coordinate, the first half varying with the column."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return torch.from_numpy(np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], axis=1)).float()[None]


# ----------------------------------------------------------------------------- import: three layouts


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_state_dict_imports_token_by_token(tmp_path, suffix):
    from safetensors.torch import save_file

    model = _timm_vit(0)
    src = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(src)) if suffix == ".safetensors" else torch.save(state, src)
    out = import_encoder(src, tmp_path / "enc", num_heads=4)
    x = _images()
    assert _diff(_ours(out, x), _timm_tokens(model, x)) <= TOL
    with torch.no_grad():  # the probes' pooled features = timm's pre-logits
        pooled = model.forward_head(model.forward_features((x - MEAN) / STD), pre_logits=True)
        assert _diff(ijepa.load_encoder(out).features(x), pooled) <= TOL
    info = read_encoder_info(out)
    assert info["encoder"]["pos_embed"] == "stored" and info["encoder"]["norm_eps"] == 1e-6
    assert info["encoder"]["norm_mean"] == [0.485, 0.456, 0.406]
    src_meta = info["metadata"]["source"]
    assert src_meta["format"] == "timm" and src_meta["sha256"] == file_sha256(src) and "which" not in src_meta


def test_official_checkpoint_target_and_context_encoders(tmp_path):
    target, context = _timm_vit(0), _timm_vit(1)
    ref_table = _mae_sincos(64, 4)
    # the reference stores its own sin-cos table: a permutation of timm's channels, not equal to them
    ours = _sincos((4, 4), 64)[None]
    assert not torch.allclose(ref_table, ours, atol=1e-3)
    assert torch.allclose(ref_table.sort(dim=-1).values, ours.sort(dim=-1).values, atol=1e-5)
    for m in (target, context):
        m.pos_embed.data.copy_(ref_table)
    opt = torch.optim.AdamW(context.parameters())
    context(torch.zeros(1, 3, 28, 28)).sum().backward()
    opt.step()
    opt.zero_grad()
    wrap = lambda m: {f"module.{k}": v for k, v in m.state_dict().items()}  # noqa: E731 (DDP names)
    ckpt = {"encoder": wrap(context), "predictor": {"module.mask_token": torch.zeros(1, 1, 32)},
            "target_encoder": wrap(target), "opt": opt.state_dict(), "scaler": None, "epoch": 300,
            "loss": 0.125, "batch_size": 2048, "world_size": 16, "lr": 1e-3}
    src = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    torch.save(ckpt, src)
    x = _images()
    tgt = import_encoder(src, tmp_path / "target", num_heads=4)
    ctx = import_encoder(src, tmp_path / "context", which="encoder", num_heads=4)
    assert _diff(_ours(tgt, x), _timm_tokens(target, x)) <= TOL
    assert _diff(_ours(ctx, x), _timm_tokens(context, x)) <= TOL
    meta = read_encoder_info(tgt)["metadata"]["source"]
    assert meta["format"] == "official" and meta["which"] == "target_encoder" and meta["epoch"] == 300
    assert meta["sha256"] == file_sha256(src) and read_encoder_info(ctx)["metadata"]["source"]["which"] == "encoder"
    # the trap: the same weights with the table rebuilt instead of loaded give other features, silently
    enc = ijepa.load_encoder(tgt)
    rebuilt = ViTEncoder(dataclasses.replace(enc.cfg, pos_embed="sincos"))
    rebuilt.load_state_dict({k: v for k, v in enc.state_dict().items() if k != "pos_embed"})
    with torch.no_grad():
        assert _diff(rebuilt(x), _timm_tokens(target, x)) > 1e-2


@pytest.mark.parametrize("heads", [4, 2])
def test_hugging_face_folder_imports_token_by_token(tmp_path, heads):
    transformers = _transformers()
    cfg = transformers.IJepaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=heads,
                                   intermediate_size=256, image_size=28, patch_size=7, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    model = transformers.IJepaModel(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    out = import_encoder(tmp_path / "hf", tmp_path / "enc")  # heads and eps from config.json
    x = _images()
    with torch.no_grad():
        ref = model(pixel_values=(x - MEAN) / STD).last_hidden_state
    assert _diff(_ours(out, x), ref) <= TOL
    info = read_encoder_info(out)
    assert info["encoder"]["num_heads"] == heads and info["metadata"]["source"]["format"] == "hf"
    assert info["metadata"]["source"]["sha256"] == file_sha256(tmp_path / "hf" / "model.safetensors")


def test_hugging_face_5x_names_with_the_classifier_prefix_import(tmp_path):
    """save_pretrained writes transformers 4.x names (as the Hub's files); a state dict taken in memory
    has 5.x names, and IJepaForImageClassification's carries `ijepa.` and a classifier."""
    from safetensors.torch import save_file

    transformers = _transformers()
    cfg = transformers.IJepaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=256, image_size=28, patch_size=7, layer_norm_eps=1e-6,
                                   num_labels=5)
    torch.manual_seed(0)
    model = transformers.IJepaForImageClassification(cfg).eval()
    state = model.state_dict()
    assert "ijepa.layers.0.attention.q_proj.weight" in state and "classifier.weight" in state
    (tmp_path / "hf").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "config.json").write_text(cfg.to_json_string())
    out = import_encoder(tmp_path / "hf", tmp_path / "enc")
    x = _images()
    with torch.no_grad():
        ref = model.ijepa(pixel_values=(x - MEAN) / STD).last_hidden_state
    assert _diff(_ours(out, x), ref) <= TOL


# ----------------------------------------------------------------------------- export: timm and HF


def _own_encoder(path: Path) -> Path:
    """One of our own encoders: grey, LayerNorm eps 1e-5, sin-cos table not in the weights."""
    torch.manual_seed(3)
    save_encoder(ViTEncoder(tiny_encoder_config(img_size=16, embed_dim=32, depth=2, num_heads=2)), path)
    return path


@pytest.mark.parametrize("kind", ["own", "imported"])
def test_export_reloads_in_timm_and_transformers(tmp_path, kind):
    transformers = _transformers()
    if kind == "own":
        enc_dir, x = _own_encoder(tmp_path / "enc"), _images(size=16, chans=1)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in _timm_vit(0).state_dict().items()}, str(tmp_path / "v.safetensors"))
        enc_dir, x = import_encoder(tmp_path / "v.safetensors", tmp_path / "enc", num_heads=4), _images()
    enc = ijepa.load_encoder(enc_dir)
    mean, std = enc.norm_mean, enc.norm_std
    with torch.no_grad():
        ours = enc(x)
    for name in ("model.safetensors", "model.pth"):
        spec = export_encoder(enc_dir, tmp_path / name, "timm")
        model = timm.create_model(spec["model_name"], **timm_kwargs(spec, tmp_path / name)).eval()
        assert _diff(_timm_tokens(model, x, mean, std), ours) <= TOL
    namespace: dict = {}
    exec(spec["python"], namespace)  # the printed line, as a user pastes it
    assert _diff(_timm_tokens(namespace["model"].eval(), x, mean, std), ours) <= TOL
    export_encoder(enc_dir, tmp_path / "hf", "hf")
    hf = transformers.IJepaModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert _diff(hf(pixel_values=(x - mean) / std).last_hidden_state, ours) <= TOL
    # and back: the timm export (heads, eps, mean, std from the <file>.json next to it) and the HF
    # folder (heads, eps from config.json; mean/std default to ImageNet's, so given here)
    again = import_encoder(tmp_path / "model.safetensors", tmp_path / "again_timm")
    assert _diff(_ours(again, x), ours) <= TOL
    again = import_encoder(tmp_path / "hf", tmp_path / "again_hf", mean=enc.cfg.norm_mean, std=enc.cfg.norm_std)
    assert _diff(_ours(again, x), ours) <= TOL


def test_released_shapes_get_timm_names_and_the_readme_kwargs():
    from ijepa.interop.timm_format import timm_spec
    from ijepa.models import EncoderConfig

    imagenet = dict(in_chans=3, norm_mean=(0.485, 0.456, 0.406), norm_std=(0.229, 0.224, 0.225),
                    pos_embed="stored", norm_eps=1e-6)
    h14 = EncoderConfig(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, **imagenet)
    h16 = EncoderConfig(img_size=448, patch_size=16, embed_dim=1280, depth=32, num_heads=16, **imagenet)
    g16 = EncoderConfig(img_size=224, patch_size=16, embed_dim=1408, depth=40, num_heads=16,
                        mlp_ratio=6144 / 1408, **imagenet)
    assert [timm_spec(c)["model_name"] for c in (h14, h16, g16)] == [
        "vit_huge_patch14_gap_224", "vit_huge_patch16_gap_448", "vit_giant_patch16_gap_224"]
    assert all(timm_spec(c)["kwargs"] == {} for c in (h14, h16, g16))
    assert ijepa.models.preset("vit_b16").encoder.embed_dim == 768
    b16 = timm_spec(ijepa.models.preset("vit_b16").encoder)
    assert b16["model_name"] == "vit_base_patch16_224" and b16["norm_eps"] == 1e-5
    assert b16["kwargs"]["class_token"] is False and b16["kwargs"]["global_pool"] == "avg"


# ----------------------------------------------------------------------------- bad sources


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir())


def test_bad_sources_are_clear_errors_and_write_nothing(tmp_path):
    model = _timm_vit(0)
    good = tmp_path / "good.pth.tar"
    torch.save({"encoder": {f"module.{k}": v for k, v in model.state_dict().items()},
                "target_encoder": {f"module.{k}": v for k, v in model.state_dict().items()}}, good)
    out = tmp_path / "out"
    cases = {}
    (tmp_path / "truncated.pth.tar").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated.pth.tar"] = "not a torch.save checkpoint"
    (tmp_path / "notes.txt").write_text("hello")
    cases["notes.txt"] = "not a torch.save checkpoint"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "resnet.pth")
    cases["resnet.pth"] = "no tensor 'patch_embed.proj.weight'"
    torch.save({"epoch": 3, "opt": {}}, tmp_path / "noenc.pth.tar")
    cases["noenc.pth.tar"] = "expected an I-JEPA checkpoint"
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    cases["bad.safetensors"] = "not a readable safetensors file"
    torch.save({"target_encoder": {"module.x": torch.zeros(1)}, "encoder": {}}, tmp_path / "odd.pth.tar")
    cases["odd.pth.tar"] = "no tensor 'patch_embed.proj.weight'"
    for name, message in cases.items():
        with pytest.raises(InteropError, match=message) as err:
            import_encoder(tmp_path / name, out, num_heads=4)
        assert str(tmp_path / name) in str(err.value)
        _assert_nothing_written(out)
    with pytest.raises(InteropError, match="--num-heads"):  # width 64: heads unknown
        import_encoder(good, out)
    torch.save({"target_encoder": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "only_target.pth.tar")
    with pytest.raises(InteropError, match="has no 'encoder' state dict"):
        import_encoder(tmp_path / "only_target.pth.tar", out, which="encoder", num_heads=4)
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(InteropError, match="model_type is 'vit', expected 'ijepa'"):
        import_encoder(tmp_path / "vit", out)
    _assert_nothing_written(out)


class _Opaque:  # a pickled class: weights_only=True refuses it
    pass


def test_untrusted_pickles_are_refused_unless_trusted(tmp_path):
    state = {f"module.{k}": v for k, v in _timm_vit(0).state_dict().items()}
    src = tmp_path / "ckpt.pth.tar"
    torch.save({"target_encoder": state, "encoder": state, "extra": _Opaque()}, src)
    with pytest.raises(InteropError, match="--trust-pickle"):
        import_encoder(src, tmp_path / "out", num_heads=4)
    _assert_nothing_written(tmp_path / "out")
    assert import_encoder(src, tmp_path / "out", num_heads=4, trust_pickle=True).is_dir()
    with pytest.raises(InteropError, match="already holds an encoder"):
        import_encoder(src, tmp_path / "out", num_heads=4, trust_pickle=True)


# ----------------------------------------------------------------------------- command line


def test_cli_import_and_export(tmp_path, capsys):
    from ijepa.cli import main

    torch.save({k: v for k, v in _timm_vit(0).state_dict().items()}, tmp_path / "vit.pth")
    assert main(["import", str(tmp_path / "vit.pth"), str(tmp_path / "enc"), "--num-heads", "4"]) == 0
    assert '"format": "timm"' in capsys.readouterr().out
    assert main(["export", str(tmp_path / "enc"), str(tmp_path / "vit.safetensors"), "--format", "timm"]) == 0
    assert "timm.create_model('vit_base_patch16_224'" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "enc"), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert main(["import", str(tmp_path / "vit.pth"), str(tmp_path / "enc2")]) == 2
    assert "--num-heads" in capsys.readouterr().err and not (tmp_path / "enc2").exists()
    # `python -m ijepa` is the same command
    proc = subprocess.run([sys.executable, "-m", "ijepa", "import", str(tmp_path / "hf"), str(tmp_path / "enc3")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    x = _images()
    assert _diff(_ours(tmp_path / "enc3", x), _ours(tmp_path / "enc", x)) <= TOL
