"""Sharding + reading: round trip, byte-identical reruns, atomicity, verification, config errors, DDP reads."""
from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ijepa.data.shards as shards_mod
from ijepa.data import reader
from ijepa.config import ConfigError, from_mapping
from ijepa.data import (ManifestMissingError, ShardConfig, ShardError, UnknownSplitError, load_manifest, load_split,
                        make_loader, make_pipeline, shard_dataset, split_urls, verify_shards)
from ijepa.data.scenes import generate

TINY = {"source": "scenes", "image_size": 24, "maxcount": 8, "seed": 5,
        "scenes": {"sizes": {"train": 20, "val": 6, "test": 3}}}


def tars(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tar" in p.name)


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "scenes"
    shard_dataset(TINY, out, progress=False)
    return out


def test_roundtrip_exact_images_and_labels(scenes_dir):
    m = load_manifest(scenes_dir)
    assert m["image_size"] == 24 and m["channels"] == 3 and m["image"]["format"] == "png"
    assert {s: m["splits"][s]["samples"] for s in m["splits"]} == {"train": 20, "val": 6, "test": 3}
    assert [s["samples"] for s in m["splits"]["train"]["shards"]] == [8, 8, 4]
    assert tars(scenes_dir) == sorted(["train-000000.tar", "train-000001.tar", "train-000002.tar",
                                       "val-000000.tar", "test-000000.tar"])
    for split, n in (("train", 20), ("val", 6)):
        x, y = load_split(scenes_dir, split)
        assert x.dtype == torch.uint8 and tuple(x.shape) == (n, 3, 24, 24)
        for i in range(n):
            img, lab, _ = generate(5, split, i, 24)
            assert np.array_equal(x[i].permute(1, 2, 0).numpy(), img)  # png is lossless
            assert {k: int(v[i]) for k, v in y.items()} == lab
    x, y = load_split(scenes_dir, "val", labels=False)
    assert y == {} and x.shape[0] == 6
    # the streaming reader returns the same samples (keys, images and labels)
    ref, ref_y = load_split(scenes_dir, "train")
    seen = {}
    for key, img, lab in make_pipeline(scenes_dir, "train", with_keys=True):
        seen[key] = (img, lab)
    assert len(seen) == 20
    for i in range(20):
        img, lab = seen[f"train_{i:08d}"]
        assert torch.equal(img, ref[i]) and lab == {k: int(v[i]) for k, v in ref_y.items()}


def test_jpg_and_grey_roundtrip(tmp_path):
    res = shard_dataset({**TINY, "format": "jpg", "jpeg_quality": 95, "scenes": {"sizes": {"train": 4}}},
                        tmp_path / "j", progress=False)
    assert res.manifest["image"]["format"] == "jpg" and res.samples == 4 and len(res.preview) == 4
    x, _ = load_split(tmp_path / "j", "train")
    for i in range(4):
        img = generate(5, "train", i, 24)[0].astype(np.float32)
        assert np.abs(x[i].permute(1, 2, 0).numpy() - img).mean() < 6.0


@pytest.mark.parametrize("channels", [1, 3])
def test_decoded_images_own_writable_memory(channels):
    # np.asarray(PIL image) is a read-only view; a tensor over it warns and must not be written
    buf = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(buf, format="png")
    assert reader._decode_image(buf.getvalue(), channels).flags.writeable
    img, labels = reader.decode_sample({"png": buf.getvalue(), "cls": b"7"}, channels, ["cls"])
    assert img.shape == (channels, 4, 4) and labels == {"cls": 7}


def test_byte_identical_rerun(tmp_path, scenes_dir):
    shard_dataset(TINY, tmp_path / "again", progress=False)
    for name in tars(scenes_dir) + ["manifest.json"]:
        assert (tmp_path / "again" / name).read_bytes() == (scenes_dir / name).read_bytes(), name
    other = shard_dataset({**TINY, "seed": 6}, tmp_path / "other", progress=False).manifest
    assert other["splits"]["train"]["shards"][0]["sha256"] != \
        load_manifest(scenes_dir)["splits"]["train"]["shards"][0]["sha256"]


class _FailingWriter(shards_mod.ShardWriter):
    """Raises when it would start the second shard (after the first one completed)."""

    def next_stream(self):
        if getattr(self, "fname", None) is not None:
            raise RuntimeError("injected failure")
        super().next_stream()


def test_failure_mid_write_leaves_no_partial_final_file_and_no_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_mod, "ShardWriter", _FailingWriter)
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="injected"):
        shard_dataset(TINY, out, progress=False)
    assert not out.exists() or list(out.iterdir()) == []
    assert not list(tmp_path.glob(".ds.staging-*"))  # staging cleaned up
    # a failed rerun over a good dataset leaves the good dataset as it was
    monkeypatch.setattr(shards_mod, "ShardWriter", _FailingWriter.__mro__[1])
    shard_dataset(TINY, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(shards_mod, "ShardWriter", _FailingWriter)
    with pytest.raises(RuntimeError):
        shard_dataset({**TINY, "seed": 9}, out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    verify_shards(out)


def test_stale_shards_from_a_larger_run_are_removed(tmp_path):
    out = tmp_path / "ds"
    shard_dataset({**TINY, "maxcount": 3}, out, progress=False)
    assert len(tars(out)) == 7 + 2 + 1
    (out / "notes.txt").write_text("kept")  # unrelated files are left alone
    m = shard_dataset(TINY, out, progress=False).manifest
    listed = sorted(s["name"] for info in m["splits"].values() for s in info["shards"])
    assert tars(out) == listed and len(listed) == 5
    assert (out / "notes.txt").exists()
    verify_shards(out)


def test_kill_mid_write_leaves_no_manifest_and_next_run_cleans_up(tmp_path):
    out = tmp_path / "ds"
    code = ("import sys; from ijepa.data import shard_dataset; "
            "shard_dataset({'source': 'scenes', 'image_size': 16, 'maxcount': 20, "
            "'scenes': {'sizes': {'train': 1000000}}}, sys.argv[1], progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list(tmp_path.glob(".ds.staging-*/train-000001.tar*")):
            time.sleep(0.05)
        assert list(tmp_path.glob(".ds.staging-*/train-000000.tar")), "the writer never finished a shard"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists() and (not out.exists() or tars(out) == [])
    with pytest.raises(ManifestMissingError, match="manifest.json"):
        verify_shards(out)
    shard_dataset(TINY, out, progress=False)
    assert not list(tmp_path.glob(".ds.staging-*"))  # the dead run's staging folder is gone
    verify_shards(out)


def test_verify_catches_altered_and_missing_shards(tmp_path):
    out = tmp_path / "ds"
    shard_dataset(TINY, out, progress=False)
    assert verify_shards(out)["dataset"] == "scenes"
    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="train-000001.tar.*sha256"):
        verify_shards(out)
    shard.write_bytes(bytes(data[:-512]))
    with pytest.raises(ShardError, match="train-000001.tar has .* bytes"):
        verify_shards(out)
    shard.unlink()
    with pytest.raises(ShardError, match="missing shard .*train-000001.tar"):
        verify_shards(out)
    verify_shards(out, ["val"])  # other splits are fine
    (out / "manifest.json").unlink()
    with pytest.raises(ManifestMissingError, match="manifest.json"):
        load_manifest(out)
    with pytest.raises(FileNotFoundError):
        load_split(out, "train")


@pytest.mark.parametrize("mapping, field", [
    ({"scenes": {"sizes": {"train": -1}}}, "sizes.train"),
    ({"source": "webcam"}, "ShardConfig.source"),
    ({"image_size": 64.5}, "ShardConfig.image_size"),
    ({"image_size": "64"}, "ShardConfig.image_size"),
    ({"maxcount": 0}, "maxcount"),
    ({"format": "gif"}, "ShardConfig.format"),
    ({"jpeg_quality": 101}, "jpeg_quality"),
    ({"seed": -3}, "seed"),
    ({"max_samples": {"train": -2}}, "max_samples.train"),
    ({"scenes": {"min_objects": 5, "max_objects": 4}}, "max_objects"),
    ({"fashion_mnist": {"val_size": -1}}, "val_size"),
    ({"imagefolder": {"val_fraction": 1.5}}, "val_fraction"),
    ({"source": "imagefolder"}, "imagefolder.root"),
    ({"source": "fashion_mnist", "image_size": 20}, "image_size"),
    ({"bogus": 1}, "bogus"),
])
def test_config_errors_name_the_field_before_any_work(tmp_path, mapping, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        shard_dataset(mapping, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_direct_config_is_validated_too(tmp_path):
    with pytest.raises(ConfigError, match="maxcount"):
        shard_dataset(ShardConfig(maxcount=-5), tmp_path / "out", progress=False)
    cfg = from_mapping(ShardConfig, {"scenes": {"sizes": {"train": 2}}})
    assert cfg.size == 64 and cfg.name == "scenes"


def test_unknown_split(scenes_dir):
    with pytest.raises(UnknownSplitError, match="no split 'nope'"):
        load_split(scenes_dir, "nope")
    with pytest.raises(KeyError):
        split_urls(scenes_dir, "nope")


def _keys(pipe) -> list[str]:
    return [k for keys, _, _ in pipe for k in keys]


def test_ddp_style_reading_equal_batches_per_rank_and_deterministic(scenes_dir):
    kw = dict(batch_size=4, shuffle_buffer=8, seed=1, epoch=0, world_size=2, resampled=True, with_keys=True)
    per_rank = [_keys(make_pipeline(scenes_dir, "train", rank=r, **kw)) for r in range(2)]
    # ceil(20 / 2) = 10 samples per rank -> 2 full batches each
    assert [len(k) for k in per_rank] == [8, 8]
    assert per_rank == [_keys(make_pipeline(scenes_dir, "train", rank=r, **kw)) for r in range(2)]  # same again
    assert per_rank[0] != _keys(make_pipeline(scenes_dir, "train", rank=0, **{**kw, "epoch": 1}))  # new epoch
    # explicit epoch length
    assert len(_keys(make_pipeline(scenes_dir, "train", rank=1, **{**kw, "epoch_samples": 12}))) == 12
    # a loader with workers: same number of batches on both ranks, same order on a rerun
    loads = [[b[0] for b in make_loader(scenes_dir, "train", num_workers=2, rank=r, **kw)] for r in range(2)]
    assert [len(x) for x in loads] == [2, 2]
    assert loads[0] == [b[0] for b in make_loader(scenes_dir, "train", num_workers=2, rank=0, **kw)]


def test_non_resampled_ranks_partition_the_shards(scenes_dir):
    kw = dict(batch_size=None, shardshuffle=True, seed=3, world_size=2, with_keys=True)
    parts = [[k for k, _, _ in make_pipeline(scenes_dir, "train", rank=r, **kw)] for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == [f"train_{i:08d}" for i in range(20)]
    batches = list(make_pipeline(scenes_dir, "train", batch_size=6))
    assert [b[0].shape[0] for b in batches] == [6, 6, 6, 2]  # batches span shards, partial kept
    assert set(batches[0][1]) == {"cls", "count", "depth"} and batches[0][1]["cls"].dtype == torch.long
    imgs = next(iter(make_pipeline(scenes_dir, "val", labels=False, batch_size=3)))
    assert isinstance(imgs, torch.Tensor) and imgs.shape == (3, 3, 24, 24)


def test_preview_figure(tmp_path, scenes_dir):
    from matplotlib.figure import Figure

    from ijepa.viz.samples import plot_samples, save_samples_png

    res = shard_dataset({**TINY, "preview": 5, "scenes": {"sizes": {"train": 5}}}, tmp_path / "p", progress=False)
    names = {k: v["names"] for k, v in res.manifest["labels"].items()}
    fig = plot_samples(res.preview, class_names=names)
    assert isinstance(fig, Figure) and "cls=" in fig.axes[0].get_title()
    x, y = load_split(scenes_dir, "val")
    path = save_samples_png(x, tmp_path / "fig" / "s.png", labels=y, n=4, class_names=names)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(res.manifest)  # plain JSON
