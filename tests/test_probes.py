"""Downstream probes: linear heads, low-shot sampling, feature cache, run_probes end to end, figures."""
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
from ijepa.probes import ProbeConfig, ProbeError, lowshot_counts, lowshot_indices, run_probes

TINY = tiny_encoder_config(img_size=8, embed_dim=16, depth=1)
FAST = {"max_iter": 40, "weight_decays": [1e-3, 1e-1], "lowshot_per_class": 2, "feature_batch_size": 64}


# ----------------------------------------------------------------------------- config


def test_config_defaults_and_errors_name_the_field():
    cfg = from_mapping(ProbeConfig, {}, "probe")
    assert cfg.n_last == 1 and cfg.batchnorm and cfg.lowshot_fraction == 0.01 and cfg.lowshot_seeds == 3
    assert cfg.probes == ("linear", "lowshot", "count", "depth") and cfg.baselines == ("random_init", "pixels")
    for bad, needle in [({"n_last": 2}, "n_last"), ({"probes": ["linear", "bogus"]}, "probe.probes"),
                        ({"baselines": ["pixels", "pixels"]}, "baselines"), ({"lowshot_seeds": 0}, "lowshot_seeds"),
                        ({"lowshot_fraction": 0.0}, "lowshot_fraction"), ({"weight_decays": []}, "weight_decays"),
                        ({"lowshot_per_class": 0}, "lowshot_per_class"), ({"solver": "sgd"}, "probe.solver"),
                        ({"batchnorm": 1}, "probe.batchnorm"), ({"n_lats": 1}, "n_lats")]:
        with pytest.raises(ConfigError, match=needle):
            from_mapping(ProbeConfig, bad, "probe")


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
    assert metrics["skipped"] == {"count": "dataset has no count labels", "depth": "dataset has no depth labels"}
    assert set(metrics["probes"]) == {"linear", "lowshot"}
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
    cfg = dict(FAST, n_last=4, probes=["linear", "count", "depth"], baselines=["pixels"])
    metrics, extras = run_probes(cfg, enc, shards, tmp_path / "cache", progress=False)
    assert metrics["skipped"] == {}
    assert set(metrics["probes"]) == {"linear", "count", "depth"}
    for probe in ("count", "depth"):
        assert set(metrics["probes"][probe]) == {"ijepa", "pixels", "n_labels"}
        assert metrics["probes"][probe]["n_labels"] == SPLITS["train"]
    assert extras["feature_dims"]["ijepa"] == 4 * 16
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
    assert len(fig.axes[0].patches) == 6
    cm = [[5, 1, 0], [0, 6, 0], [1, 0, 4]]
    assert plot_confusion(cm, ["a", "b", "c"]).axes
    with pytest.raises(ValueError, match="class names"):
        plot_confusion(cm, ["a"])
    out = save_probe_pngs(metrics, {"confusion": cm, "class_names": ["a", "b", "c"]}, tmp_path / "plots")
    for path in out.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
