"""Downstream probes: linear heads, attentive probes, kNN rows, low-shot sampling, feature and token
cache, run_probes end to end, figures."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_encoder_config
from ijepa import features as feats_mod
from ijepa.config import ConfigError, from_mapping
from ijepa.export import EncoderFileError, file_sha256, save_encoder
from ijepa.linear import fit_linear_probe
from ijepa.models import EncoderConfig, ViTEncoder
from ijepa.attentive import (AttentiveConfig, AttentiveProbe, fit_attentive_probe, pixel_patch_tokens,
                             with_position_code)
from ijepa.probes import PROBES, ProbeConfig, ProbeError, lowshot_counts, lowshot_indices, run_probes

TINY = tiny_encoder_config(img_size=8, embed_dim=16, depth=1)
FAST = {"max_iter": 40, "weight_decays": [1e-3, 1e-1], "lowshot_per_class": 2, "feature_batch_size": 64,
        "attentive": {"epochs": 3, "warmup_epochs": 1, "batch_size": 16, "mlp_ratio": 1.0, "position_dim": 8}}
MODELS = {"ijepa", "random_init", "pixels"}


# ----------------------------------------------------------------------------- config


def test_config_defaults_and_errors_name_the_field():
    cfg = from_mapping(ProbeConfig, {}, "probe")
    assert cfg.n_last == 1 and cfg.batchnorm and cfg.lowshot_fraction == 0.01 and cfg.lowshot_seeds == 3
    assert cfg.probes == PROBES and cfg.baselines == ("random_init", "pixels")
    assert PROBES[:4] == ("linear", "lowshot", "count", "depth")
    assert {"attentive_cls", "attentive_count", "attentive_depth", "knn_cls", "knn_count", "knn_depth"} <= set(PROBES)
    assert cfg.attentive == AttentiveConfig() and (cfg.knn.k, cfg.knn.temperature) == (20, 0.07)
    for bad, needle in [({"n_last": 2}, "n_last"), ({"probes": ["linear", "bogus"]}, "probe.probes"),
                        ({"baselines": ["pixels", "pixels"]}, "baselines"), ({"lowshot_seeds": 0}, "lowshot_seeds"),
                        ({"lowshot_fraction": 0.0}, "lowshot_fraction"), ({"weight_decays": []}, "weight_decays"),
                        ({"lowshot_per_class": 0}, "lowshot_per_class"), ({"solver": "sgd"}, "probe.solver"),
                        ({"batchnorm": 1}, "probe.batchnorm"), ({"n_lats": 1}, "n_lats"),
                        ({"knn": {"k": 0}}, r"probe.knn: knn.k must be >= 1, got 0"),
                        ({"knn": {"temperature": -1}}, r"knn.temperature must be positive, got -1"),
                        ({"attentive": {"heads": 3, "width": 16}}, r"attentive.width 16 is not divisible by "
                                                                    r"attentive.heads 3"),
                        ({"attentive": {"epochs": 0}}, r"attentive.epochs must be >= 1, got 0"),
                        ({"attentive": {"warmup_epochs": 5, "epochs": 5}}, r"attentive.warmup_epochs must be in"),
                        ({"attentive": {"lr": 0}}, r"attentive.lr must be positive"),
                        ({"attentive": {"position_dim": 6}}, r"attentive.position_dim must be a positive multiple"),
                        ({"attentive": {"epoch": 3}}, r"probe.attentive: unknown field\(s\) \['epoch'\]")]:
        with pytest.raises(ConfigError, match=needle):
            from_mapping(ProbeConfig, bad, "probe")


def test_probe_parameter_files_load_for_every_dataset_and_job():
    """conf/base and the longer job's conf/full (merged over base) give valid ProbeConfigs."""
    from ijepa.params import probe_mapping, read_parameters

    root = Path(__file__).resolve().parents[1]
    for dirs in (["conf/base"], ["conf/base", "conf/full"]):
        params = read_parameters([root / d for d in dirs])
        for dataset in ("scenes", "fashion_mnist", "imagefolder"):
            cfg = from_mapping(ProbeConfig, probe_mapping(params, dataset), "probe")
            assert set(cfg.probes) == set(PROBES)


# ----------------------------------------------------------------------------- linear heads


def _split(x, y, n_train, n_val):
    return (x[:n_train], y[:n_train], x[n_train:n_train + n_val], y[n_train:n_train + n_val],
            x[n_train + n_val:], y[n_train + n_val:])


@pytest.mark.parametrize("batchnorm", [True, False])
def test_linear_probe_one_hot_features_near_perfect(batchnorm):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (1600,), generator=g)
    x = torch.nn.functional.one_hot(y, 10).float() * 3.0 + 0.05 * torch.randn(1600, 10, generator=g)
    x = torch.cat([x, torch.randn(1600, 6, generator=g)], dim=1)  # plus a few nuisance dims
    tx, ty, vx, vy, sx, sy = _split(x, y, 1000, 300)
    head = fit_linear_probe(tx, ty, vx, vy, 10, [1e-4, 1e-2], batchnorm=batchnorm, max_iter=100)
    assert head.top1(sx, sy) >= 0.99


def test_linear_probe_noise_near_chance():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3000, 32, generator=g), torch.randint(0, 10, (3000,), generator=g)
    tx, ty, vx, vy, sx, sy = _split(x, y, 1500, 500)
    head = fit_linear_probe(tx, ty, vx, vy, 10, [1e-3, 1e-1], max_iter=100)
    assert 0.05 <= head.top1(sx, sy) <= 0.16


def test_linear_probe_is_deterministic_and_adam_solver_learns():
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 4, (900,), generator=g)
    x = torch.randn(900, 8, generator=g) + 2.0 * torch.nn.functional.one_hot(y, 8).float()
    tx, ty, vx, vy, sx, sy = _split(x, y, 500, 200)
    a = fit_linear_probe(tx, ty, vx, vy, 4, [1e-3, 1e-1], max_iter=60)
    b = fit_linear_probe(tx, ty, vx, vy, 4, [1e-3, 1e-1], max_iter=60)
    assert torch.equal(a.weight, b.weight) and a.weight_decay == b.weight_decay
    adam = fit_linear_probe(tx, ty, vx, vy, 4, [1e-3], solver="adam", epochs=15, lr=0.05, batch_size=128)
    assert abs(adam.top1(sx, sy) - a.top1(sx, sy)) < 0.05


# ----------------------------------------------------------------------------- attentive probe


def test_attentive_forward_equals_textbook_cross_attention():
    torch.manual_seed(0)
    probe = AttentiveProbe(in_dim=12, n_classes=5, width=16, heads=4, queries=2, mlp_ratio=2.0)
    for p in probe.parameters():  # away from the init (zero biases) so every term counts
        torch.nn.init.normal_(p, std=0.3)
    probe.set_input_stats(torch.randn(12), torch.rand(12) + 0.5)  # standardisation folded into the products
    x = torch.randn(3, 7, 12) * 2 + 1
    fast, ref = probe(x), probe.forward_reference(x)
    assert fast.shape == (3, 5)
    assert torch.allclose(fast, ref, atol=1e-5), (fast - ref).abs().max()


def _where_tokens(n: int, gen: torch.Generator, t: int = 16, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens carrying a position code plus noise; one token per sample is made bright, the label
    is which quarter of the positions holds it. The mean over tokens is the same for every label."""
    pos = torch.randn(t, d, generator=gen)
    bright = 4.0 * torch.randn(d, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    where = y * (t // 4) + torch.randint(0, t // 4, (n,), generator=gen)
    x = pos + 0.3 * torch.randn(n, t, d, generator=gen)
    x[torch.arange(n), where] += bright
    return x, y


def test_attentive_probe_learns_where_mean_pooling_cannot():
    gen = torch.Generator().manual_seed(0)
    x, y = _where_tokens(1024, gen)
    tx, ty, vx, vy, sx, sy = _split(x, y, 640, 192)
    cfg = AttentiveConfig(epochs=12, warmup_epochs=1, batch_size=64, lr=1e-2, mlp_ratio=1.0)
    fitted = fit_attentive_probe(cfg, tx, ty, vx, vy, 4, seed=0)
    linear = fit_linear_probe(tx.mean(1), ty, vx.mean(1), vy, 4, [1e-4, 1e-2], max_iter=100)
    attentive_top1, linear_top1 = fitted.top1(sx, sy), linear.top1(sx.mean(1), sy)
    assert attentive_top1 >= 0.85 and linear_top1 <= 0.45, (attentive_top1, linear_top1)
    # the kept weights are those of the best val epoch, and reproduce its val top-1
    assert len(fitted.val_top1) == 12 and fitted.val_top1[fitted.epoch - 1] == max(fitted.val_top1)
    assert fitted.top1(vx, vy) == max(fitted.val_top1)
    again = fit_attentive_probe(cfg, tx, ty, vx, vy, 4, seed=0)
    assert again.val_top1 == fitted.val_top1  # deterministic for a seed
    assert set(fitted.details(cfg)) >= {"epoch", "val_top1", "lr", "weight_decay", "width", "heads", "seconds_joint"}


def test_pixel_patch_tokens_follow_the_encoder_token_order():
    images = torch.arange(2 * 3 * 8 * 8).reshape(2, 3, 8, 8).to(torch.uint8)
    tok = pixel_patch_tokens(images, 4)
    assert tok.shape == (2, 4, 4 * 4 * 3) and tok.dtype == torch.uint8
    # token 1 is the top-right patch: rows 0-3, columns 4-7, pixels (y, x, channel)
    assert torch.equal(tok[1, 1].reshape(4, 4, 3), images[1, :, 0:4, 4:8].permute(1, 2, 0))
    # the same order as the encoder's PatchEmbed (a conv with stride p, flattened row-major)
    embed = torch.nn.Conv2d(3, 5, 4, stride=4, bias=False)
    conv = embed(images.float()).flatten(2).transpose(1, 2)
    lin = tok.float() @ embed.weight.permute(0, 2, 3, 1).reshape(5, -1).t()
    assert torch.allclose(conv, lin, atol=1e-3)
    coded = with_position_code(tok, (2, 2), 8)
    assert coded.shape == (2, 4, 48 + 8) and torch.equal(coded[0, :, 48:], coded[1, :, 48:])
    assert not torch.equal(coded[0, 0, 48:], coded[0, 1, 48:])  # each position its own code
    with pytest.raises(ValueError, match="not divisible by the patch size 3"):
        pixel_patch_tokens(images, 3)


# ----------------------------------------------------------------------------- low-shot


def test_lowshot_takes_exactly_the_stated_labels_per_class():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([200, 55, 7, 150])])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]
    expect = {0: 20, 1: 6, 2: 1, 3: 15}  # max(1, round(0.1 * n))
    assert lowshot_counts(labels, fraction=0.1) == expect
    idx = lowshot_indices(labels, seed=0, fraction=0.1)
    assert idx.unique().numel() == idx.numel() == sum(expect.values())
    assert dict(zip(*[t.tolist() for t in labels[idx].unique(return_counts=True)])) == expect
    idx3 = lowshot_indices(labels, seed=0, per_class=3)
    assert labels[idx3].bincount().tolist() == [3, 3, 3, 3]
    with pytest.raises(ProbeError, match="class 2 has only 7"):
        lowshot_indices(labels, seed=0, per_class=8)


def test_lowshot_sampling_is_deterministic_per_seed_and_differs_across_seeds():
    labels = torch.arange(1000) % 10
    a, b = lowshot_indices(labels, 5, fraction=0.05), lowshot_indices(labels, 5, fraction=0.05)
    c = lowshot_indices(labels, 6, fraction=0.05)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------- features


def test_feature_cache_reused_for_same_key_recomputed_otherwise(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.full((5, 3), float(len(calls)))

    first = feats_mod.cached_features(tmp_path, "aaa", 1, "train", "fp", compute)
    again = feats_mod.cached_features(tmp_path, "aaa", 1, "train", "fp", compute)
    assert len(calls) == 1 and torch.equal(first, again)
    assert feats_mod.cache_path(tmp_path, "aaa", 1, "train").is_file()
    feats_mod.cached_features(tmp_path, "bbb", 1, "train", "fp", compute)      # other encoder
    feats_mod.cached_features(tmp_path, "aaa", 4, "train", "fp", compute)      # other n_last
    feats_mod.cached_features(tmp_path, "aaa", 1, "val", "fp", compute)        # other split
    feats_mod.cached_features(tmp_path, "aaa", 1, "train", "fp2", compute)     # shards changed
    assert len(calls) == 5
    feats_mod.cache_path(tmp_path, "aaa", 1, "val").write_bytes(b"garbage")  # corrupt -> recompute
    feats_mod.cached_features(tmp_path, "aaa", 1, "val", "fp", compute)
    assert len(calls) == 6
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_token_cache_reuse_and_invalidation(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.full((5, 3), float(len(calls))), torch.full((5, 4, 2), float(len(calls)))

    feats, toks = feats_mod.cached_features(tmp_path, "aaa", 1, "train", "fp", compute, tokens=True)
    assert toks.shape == (5, 4, 2) and toks.dtype == feats_mod.TOKEN_DTYPE and feats.dtype == torch.float32
    again = feats_mod.cached_features(tmp_path, "aaa", 1, "train", "fp", compute, tokens=True)
    assert len(calls) == 1 and torch.equal(again[1], toks)
    # a file with tokens also serves a features-only request
    assert torch.equal(feats_mod.cached_features(tmp_path, "aaa", 1, "train", "fp", compute), feats)
    feats_mod.cached_features(tmp_path, "aaa", 1, "train", "fp2", compute, tokens=True)  # shards changed
    assert len(calls) == 2
    # a features-only file is recomputed when tokens are asked for
    feats_mod.cached_features(tmp_path, "bbb", 1, "train", "fp", lambda: compute()[0])
    feats_mod.cached_features(tmp_path, "bbb", 1, "train", "fp", compute, tokens=True)
    assert len(calls) == 4
    feats_mod.cached_features(tmp_path, "bbb", 1, "train", "fp", compute, tokens=True)
    assert len(calls) == 4


def test_tokens_come_from_the_same_encoder_pass_as_the_features():
    torch.manual_seed(0)
    enc = ViTEncoder(tiny_encoder_config(in_chans=3, embed_dim=16, depth=2)).eval()
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    passes = []
    handle = enc.blocks[0].register_forward_hook(lambda *a: passes.append(1))
    feats, toks = feats_mod.extract_features(enc, images, n_last=2, batch_size=2, progress=False, keep_tokens=True)
    handle.remove()
    assert len(passes) == 3  # one pass per batch of 2: the encoder ran once
    x = images.float() / 255
    assert torch.allclose(feats, enc.features(x, n_last=2), atol=1e-6)
    assert toks.shape == (5, 16, 16) and toks.dtype == feats_mod.TOKEN_DTYPE
    assert torch.allclose(toks.float(), enc(x), atol=2e-2)  # the last layer's normalised tokens, bf16
    assert torch.allclose(toks.float().mean(1), feats[:, 16:], atol=2e-2)  # whose mean is the pooled feature
    adapted = feats_mod.AdaptedEncoder(enc, 16, 3)
    _, grey_toks = feats_mod.extract_features(adapted, images[:, :1], progress=False, keep_tokens=True)
    assert grey_toks.shape == (5, 16, 16)


def test_pixel_features_pool_large_images_only():
    small = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    f = feats_mod.pixel_features(small, max_dim=4096)
    assert f.shape == (4, 784) and torch.allclose(f, small.reshape(4, -1).float() / 255)
    big = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert feats_mod.pixel_features(big, max_dim=4096).shape == (2, 3 * 32 * 32)
    assert feats_mod.pixel_features(big, max_dim=100).shape[1] <= 100


# ----------------------------------------------------------------------------- end to end

RGB8 = tiny_encoder_config(img_size=8, in_chans=3, embed_dim=16, depth=1)
SPLITS = {"train": 48, "val": 24, "test": 24}


def _imagefolder_shards(tmp_path: Path) -> Path:
    """cls-only shards through the data library: 3 class folders of 8x8 RGB images (bright
    left / right / top half on noise), 32 per class, a quarter each carved as val and test."""
    from PIL import Image

    from ijepa.data import shard_dataset

    g = torch.Generator().manual_seed(0)
    root = tmp_path / "images"
    for c, name in enumerate(["left", "right", "top"]):
        (root / name).mkdir(parents=True)
        for j in range(32):
            img = torch.randint(0, 60, (8, 8, 3), generator=g)
            region = [(slice(None), slice(0, 4)), (slice(None), slice(4, 8)), (slice(0, 4), slice(None))][c]
            img[region] += 180
            Image.fromarray(img.clamp(0, 255).to(torch.uint8).numpy()).save(root / name / f"{j:03d}.png")
    out = tmp_path / "shards"
    shard_dataset({"source": "imagefolder", "image_size": 8,
                   "imagefolder": {"root": str(root), "val_fraction": 0.25, "test_fraction": 0.25}}, out,
                  progress=False)
    return out


def _scenes_shards(tmp_path: Path, sizes: dict[str, int] | None = None) -> Path:
    """Scenes shards (labels cls, count, depth), 16x16 RGB."""
    from ijepa.data import shard_dataset

    out = tmp_path / "scenes"
    shard_dataset({"source": "scenes", "image_size": 16, "scenes": {"sizes": sizes or SPLITS}}, out, progress=False)
    return out


def _encoder(path: Path, cfg: EncoderConfig = RGB8, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_encoder(ViTEncoder(cfg), path, metadata={"dataset": "tiny"})
    return path


def _count_extractions(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = feats_mod.extract_features

    def counted(*args, **kwargs):
        calls.append(kwargs.get("desc", ""))
        return real(*args, **kwargs)

    monkeypatch.setattr(feats_mod, "extract_features", counted)
    return calls


def test_run_probes_end_to_end_result_shape_and_cache(tmp_path, monkeypatch):
    shards = _imagefolder_shards(tmp_path)
    enc = _encoder(tmp_path / "enc")
    calls = _count_extractions(monkeypatch)
    cfg = dict(FAST, lowshot_seeds=3)
    metrics, extras = run_probes(cfg, enc, shards, tmp_path / "cache", progress=False)

    assert set(metrics) == {"encoder_sha256", "probes", "skipped"}
    assert metrics["encoder_sha256"] == file_sha256(enc / "encoder.safetensors")
    assert metrics["skipped"] == {p: f"dataset has no {label} labels" for label in ("count", "depth")
                                  for p in (label, f"attentive_{label}", f"knn_{label}")}
    assert set(metrics["probes"]) == {"linear", "lowshot", "attentive_cls", "knn_cls"}
    for row in ("attentive_cls", "knn_cls"):
        assert set(metrics["probes"][row]) == MODELS | {"n_labels"}
        assert metrics["probes"][row]["n_labels"] == SPLITS["train"]
        assert all(0.0 <= metrics["probes"][row][m] <= 1.0 for m in MODELS)
    att = extras["details"]["attentive_cls"]["pixels"]
    assert 1 <= att["epoch"] <= 3 and len(att["val_top1"]) == 3 and att["width"] == 16 and att["seconds"] > 0
    assert att["trained_with"] == ["attentive_cls"]
    assert extras["details"]["knn_cls"]["ijepa"]["k"] == 20
    # tokens: the encoders' last layer (2x2 grid of width 16); pixels: 4x4x3 patches + an 8-dim position code
    assert extras["token_shapes"] == {"ijepa": [4, 16], "random_init": [4, 16], "pixels": [4, 48 + 8]}
    lin, low = metrics["probes"]["linear"], metrics["probes"]["lowshot"]
    assert set(lin) == {"ijepa", "random_init", "pixels", "n_labels"} and lin["n_labels"] == SPLITS["train"]
    assert set(low) == {"ijepa", "ijepa_std", "random_init", "random_init_std", "pixels", "pixels_std",
                        "n_labels", "seeds"}
    assert low["n_labels"] == 3 * 2 and low["seeds"] == 3
    assert all(0.0 <= lin[m] <= 1.0 and 0.0 <= low[m] <= 1.0 for m in ("ijepa", "random_init", "pixels"))
    assert lin["pixels"] >= 0.9  # the classes are separable in pixel space
    json.dumps(metrics), json.dumps(extras)
    cm = np.asarray(extras["confusion"])
    assert cm.shape == (3, 3) and cm.sum() == SPLITS["test"]
    assert extras["class_names"] == ["left", "right", "top"]
    assert extras["feature_dims"] == {"ijepa": 16, "random_init": 16, "pixels": 3 * 8 * 8}

    # features computed once per (encoder, split): 2 encoders x 3 splits; the second run reuses them
    assert len(calls) == 6
    cached = sorted(p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert len(cached) == 6 and f"{metrics['encoder_sha256']}/n_last1/train.safetensors" in cached
    assert all(m.get("tokens") == "4x16" for m in _cache_metadata(tmp_path / "cache"))
    again, _ = run_probes(cfg, enc, shards, tmp_path / "cache", progress=False)
    assert len(calls) == 6 and again == metrics  # cached and deterministic
    # a changed encoder (new hash) is recomputed; the random-init baseline stays cached
    _encoder(tmp_path / "enc", seed=1)
    third, _ = run_probes(cfg, enc, shards, tmp_path / "cache", progress=False)
    assert len(calls) == 9 and all(c.startswith("ijepa") for c in calls[6:])
    assert third["encoder_sha256"] != metrics["encoder_sha256"]


def test_run_probes_scenes_count_depth_and_n_last_4(tmp_path):
    shards = _scenes_shards(tmp_path)
    enc = _encoder(tmp_path / "enc", tiny_encoder_config(in_chans=3, embed_dim=16, depth=4))
    rows = ["linear", "count", "depth", "attentive_cls", "attentive_count", "attentive_depth", "knn_count",
            "knn_depth"]
    cfg = dict(FAST, n_last=4, probes=rows, baselines=["pixels"])
    metrics, extras = run_probes(cfg, enc, shards, tmp_path / "cache", progress=False)
    assert metrics["skipped"] == {}
    assert list(metrics["probes"]) == rows
    for probe in rows[1:]:
        assert set(metrics["probes"][probe]) == {"ijepa", "pixels", "n_labels"}
        assert metrics["probes"][probe]["n_labels"] == SPLITS["train"]
    assert extras["feature_dims"]["ijepa"] == 4 * 16
    # the tokens are the last layer's only, whatever n_last; pixels: 4x4x3 patches of the 16-px scenes
    assert extras["token_shapes"] == {"ijepa": [16, 16], "pixels": [16, 48 + 8]}
    assert len(extras["class_names"]) == len(extras["confusion"])  # the scene shapes


def test_label_problems_surface_before_feature_extraction(tmp_path, monkeypatch):
    shards = _imagefolder_shards(tmp_path)
    enc = _encoder(tmp_path / "enc")
    calls = _count_extractions(monkeypatch)
    with pytest.raises(ProbeError, match="lowshot_per_class=17 but class 0 has only 16"):
        run_probes(dict(FAST, lowshot_per_class=17), enc, shards, tmp_path / "cache", progress=False)
    metrics, extras = run_probes(dict(FAST, probes=["count", "depth"]), enc, shards, tmp_path / "cache",
                                 progress=False)
    assert metrics["probes"] == {} and set(metrics["skipped"]) == {"count", "depth"}
    assert calls == [] and extras["confusion"] is None
    with pytest.raises(ConfigError, match=r"attentive.width 16 \(null: the encoder's token width\) is not "
                                          r"divisible by attentive.heads 3"):
        run_probes(dict(FAST, attentive={"heads": 3}), enc, shards, tmp_path / "cache", progress=False)
    assert calls == []


def test_mismatched_encoder_and_shards_name_both_values(tmp_path):
    shards = _imagefolder_shards(tmp_path)
    big = _encoder(tmp_path / "big", tiny_encoder_config(in_chans=3, embed_dim=16, depth=1))
    with pytest.raises(ProbeError, match=r"16x16.*8x8") as err:  # with the adaptation turned off
        run_probes(dict(FAST, adapt_inputs=False), big, shards, tmp_path / "cache", progress=False)
    assert "patch grid 4x4" in str(err.value) and "patch grid 2x2" in str(err.value)
    assert str(tmp_path / "big") in str(err.value) and str(shards) in str(err.value)
    grey = _encoder(tmp_path / "grey", TINY)  # RGB into a grey encoder: never adapted
    with pytest.raises(ProbeError, match=r"channels 1 vs shard channels 3 \(only grey shards are adapted"):
        run_probes(FAST, grey, shards, tmp_path / "cache", progress=False)
    with pytest.raises(ProbeError, match=r"n_last=4 but .* depth 1"):
        run_probes(dict(FAST, n_last=4), _encoder(tmp_path / "enc"), shards, tmp_path / "cache", progress=False)


def test_encoder_of_another_size_and_channels_gets_adapted_images(tmp_path, monkeypatch):
    """An RGB encoder at 16 px probed on 28-px grey shards: resized and replicated, recorded."""
    from conftest import fake_fashion_mnist, grey_shards

    shards = grey_shards(tmp_path / "shards", fake_fashion_mnist(tmp_path / "idx"))
    enc = _encoder(tmp_path / "enc", tiny_encoder_config(in_chans=3, embed_dim=16, depth=1))
    seen: list[tuple] = []
    real = ViTEncoder.features

    def spy(self, images, n_last=1):
        seen.append(tuple(images.shape[1:]))
        return real(self, images, n_last=n_last)

    monkeypatch.setattr(ViTEncoder, "features", spy)
    cfg = dict(FAST, probes=["linear"], baselines=["random_init", "pixels"])
    metrics, extras = run_probes(cfg, enc, shards, tmp_path / "cache", progress=False)
    assert metrics["input_adaptation"] == {"from": [1, 28, 28], "to": [3, 16, 16], "replicate_channels": True,
                                           "resize": "bicubic, antialias, clamped to [0, 1]"}
    assert set(seen) == {(3, 16, 16)}  # both encoders (I-JEPA and random init) see adapted images
    assert extras["feature_dims"] == {"ijepa": 16, "random_init": 16, "pixels": 28 * 28}  # pixels: as sharded
    with pytest.raises(ProbeError, match=r"16x16.*28x28"):
        run_probes(dict(cfg, adapt_inputs=False), enc, shards, tmp_path / "cache", progress=False)
    # the adapted features are cached apart from unadapted ones of the same encoder
    assert all(";input" in m["data_fingerprint"] for m in _cache_metadata(tmp_path / "cache"))


def _cache_metadata(cache: Path) -> list[dict]:
    from safetensors import safe_open

    out = []
    for f in cache.rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            out.append(fh.metadata())
    return out


def test_adapted_encoder_resizes_and_replicates_only_what_differs():
    enc = ViTEncoder(tiny_encoder_config(in_chans=3, img_size=16, embed_dim=16, depth=1)).eval()
    x = torch.rand(2, 3, 16, 16)
    same = feats_mod.AdaptedEncoder(enc, 16, 3)
    assert torch.equal(same.adapt(x), x) and torch.equal(same.features(x), enc.features(x))
    grey = torch.rand(2, 1, 8, 8)
    out = feats_mod.AdaptedEncoder(enc, 16, 3).adapt(grey)
    assert out.shape == (2, 3, 16, 16) and torch.equal(out[:, 0], out[:, 2]) and 0 <= out.min() <= out.max() <= 1


def test_missing_or_corrupted_encoder_are_clear_errors(tmp_path):
    shards = _imagefolder_shards(tmp_path)
    with pytest.raises(EncoderFileError, match="nowhere"):
        run_probes(FAST, tmp_path / "nowhere", shards, tmp_path / "cache", progress=False)
    enc = _encoder(tmp_path / "enc")
    weights = enc / "encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    with pytest.raises(EncoderFileError, match=re.escape(str(weights))):
        run_probes(FAST, enc, shards, tmp_path / "cache", progress=False)
    with pytest.raises(ConfigError, match="n_last"):
        run_probes({"n_last": 3}, enc, shards, tmp_path / "cache", progress=False)


def test_empty_or_missing_split_names_the_split(tmp_path):
    enc = _encoder(tmp_path / "enc", tiny_encoder_config(in_chans=3, embed_dim=16, depth=1))
    empty = _scenes_shards(tmp_path / "a", {"train": 6, "val": 0, "test": 4})
    with pytest.raises(ProbeError, match="split 'val'.*empty"):
        run_probes(FAST, enc, empty, tmp_path / "cache", progress=False)
    missing = _scenes_shards(tmp_path / "b", {"train": 6, "val": 4})
    with pytest.raises(ProbeError, match="split 'test' not found"):
        run_probes(FAST, enc, missing, tmp_path / "cache", progress=False)


# ----------------------------------------------------------------------------- figures


def test_probe_figures_write_pngs(tmp_path):
    from ijepa.viz.probes import plot_confusion, plot_probe_bars, save_probe_pngs

    metrics = {"encoder_sha256": "ab" * 32,
               "probes": {"linear": {"ijepa": 0.87, "random_init": 0.79, "pixels": 0.84, "n_labels": 54000},
                          "lowshot": {"ijepa": 0.74, "ijepa_std": 0.01, "random_init": 0.5, "random_init_std": 0.02,
                                      "pixels": 0.7, "pixels_std": 0.015, "n_labels": 540, "seeds": 3}},
               "skipped": {"count": "dataset has no count labels"}}
    fig = plot_probe_bars(metrics)
    assert len(fig.axes) == 1 and len(fig.axes[0].patches) == 6
    # the families side by side: a panel per label, a group per family in it
    metrics["probes"].update({"depth": {"ijepa": 0.6, "pixels": 0.8, "n_labels": 80},
                              "attentive_cls": {"ijepa": 0.9, "random_init": 0.8, "pixels": 0.85, "n_labels": 54000},
                              "attentive_depth": {"ijepa": 0.85, "pixels": 0.8, "n_labels": 80},
                              "knn_cls": {"ijepa": 0.8, "random_init": 0.7, "pixels": 0.8, "n_labels": 54000}})
    fig = plot_probe_bars(metrics)
    assert [ax.get_title() for ax in fig.axes] == ["class (cls)", "depth"]
    assert [t.get_text().split("\n")[0] for t in fig.axes[0].get_xticklabels()] == ["linear", "low-shot", "attentive",
                                                                                    "kNN"]
    assert len([p for p in fig.axes[1].patches if np.isfinite(p.get_height())]) == 4  # ijepa + pixels, 2 families
    cm = [[5, 1, 0], [0, 6, 0], [1, 0, 4]]
    assert plot_confusion(cm, ["a", "b", "c"]).axes
    with pytest.raises(ValueError, match="class names"):
        plot_confusion(cm, ["a"])
    out = save_probe_pngs(metrics, {"confusion": cm, "class_names": ["a", "b", "c"]}, tmp_path / "plots")
    for path in out.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
