"""Photo folders sharded whole (original JPEG bytes up to max_side, else resized), in worker
processes, and shard folders read from URLs: a local HTTP server on 127.0.0.1 and `pipe:cat`."""
from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_benchmark
from ijepa.data import ShardError, load_manifest, load_split, shard_dataset, verify_shards
from ijepa.data.reader import iter_split_samples, make_pipeline
from ijepa.train_data import read_shard_info


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """12 photo-like images of 40-120 px per side (every 4th a PNG), 2 classes, + bad files."""
    root = load_benchmark("photo_folder").write_photo_folder(tmp_path_factory.mktemp("photos"), n=12, classes=2,
                                                             min_side=40, max_side=120, png_every=4)
    (root / "class_0" / "empty.jpg").write_bytes(b"")
    data = (root / "class_1" / "img_00001.jpg").read_bytes()
    (root / "class_1" / "cut.jpg").write_bytes(data[: len(data) // 2])
    return root


def _cfg(root: Path, **over) -> dict:
    return {"source": "imagefolder", "image_size": 32, "jpeg_quality": 90,
            "imagefolder": {"root": str(root), "val_fraction": 0.25, "test_fraction": 0.0, "max_side": 80}, **over}


@pytest.fixture(scope="module")
def sharded(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "photos"
    shard_dataset(_cfg(photos, workers=2), out, progress=False)
    return out


def _members(shard_dir: Path, split: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for s in iter_split_samples(shard_dir, split):
        out[json.loads(s["json"])["path"]] = s
    return out


def test_photos_kept_whole_originals_byte_equal_and_skips_counted(photos, sharded):
    m = load_manifest(sharded)
    assert m["image"]["storage"] == "photo" and m["image"]["max_side"] == 80 and m["image_size"] == 32
    assert m["skipped"] == {"empty_file": 1, "truncated": 1}
    stored = {**_members(sharded, "train"), **_members(sharded, "val")}
    assert len(stored) == 12
    kept = resized = 0
    for rel, s in stored.items():
        src = photos / rel
        with Image.open(src) as im:
            w, h = im.size
        ext = "jpg" if "jpg" in s else "png"
        assert ext == src.suffix[1:]  # JPEGs stay JPEG, PNGs stay PNG (lossless)
        with Image.open(io.BytesIO(s[ext])) as im:
            sw, sh = im.size
        if max(w, h) <= 80 and ext == "jpg":
            assert s["jpg"] == src.read_bytes()  # the original bytes
            kept += 1
        else:  # resized down to max_side, aspect kept, never cropped
            assert max(sw, sh) == min(80, max(w, h)) and abs(sw / sh - w / h) < 0.05
            resized += ext == "jpg"
    assert kept > 0 and resized > 0


def test_photo_shards_are_the_same_bytes_for_any_number_of_processes(photos, sharded, tmp_path):
    one = shard_dataset(_cfg(photos, workers=1), tmp_path / "one", progress=False).manifest
    assert one["splits"] == load_manifest(sharded)["splits"]  # sha256 of every shard


def test_probe_view_is_resize_and_centre_crop(sharded):
    x, y = load_split(sharded, "val")
    assert x.shape[1:] == (3, 32, 32) and len(y["cls"]) == x.shape[0]
    from ijepa.data.photos import fit_square
    from ijepa.data.reader import decode_image

    first = next(iter_split_samples(sharded, "val"))
    img = decode_image(first.get("jpg") or first["png"], 3)
    assert torch.equal(x[0], torch.from_numpy(np.array(fit_square(img, 32))).permute(2, 0, 1))
    keys = [k for k, _, _ in make_pipeline(sharded, "val", with_keys=True)]
    assert len(keys) == x.shape[0]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request lines on stderr
        pass


@pytest.fixture
def http_root(sharded, tmp_path):
    """`sharded` and a tampered copy served on 127.0.0.1 (a free port)."""
    served = tmp_path / "www"
    shutil.copytree(sharded, served / "good")
    shutil.copytree(sharded, served / "bad")
    shard = served / "bad" / load_manifest(sharded)["splits"]["train"]["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first member's bytes; the size stays
    shard.write_bytes(bytes(data))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_http_and_pipe_locations_read_the_same_and_check_sha256(sharded, http_root):
    local_x, local_y = load_split(sharded, "train")
    for loc in (f"{http_root}/good", f"pipe:cat {sharded}", f"pipe:cat {sharded}/{{name}}", f"file:{sharded}"):
        assert load_manifest(loc) == load_manifest(sharded)
        x, y = load_split(loc, "train")
        assert torch.equal(x, local_x) and torch.equal(y["cls"], local_y["cls"]), loc
    verify_shards(f"{http_root}/good")
    info = read_shard_info(f"{http_root}/good", verify=True)
    assert info.photo and info.train_samples == local_x.shape[0]
    bad_name = load_manifest(sharded)["splits"]["train"]["shards"][0]["name"]
    with pytest.raises(ShardError, match=rf"{http_root}/bad/{bad_name} sha256 .* does not match"):
        load_split(f"{http_root}/bad", "train")
    with pytest.raises(ShardError, match="sha256"):
        verify_shards(f"{http_root}/bad")
    with pytest.raises(ShardError, match="no shard manifest at .*/absent/manifest.json"):
        load_manifest(f"{http_root}/absent")
    with pytest.raises(ShardError, match="no shard manifest"):
        load_manifest(f"pipe:cat {sharded}/absent")


def test_train_from_http_shards(sharded, http_root, tmp_path):
    from conftest import tiny_config
    from ijepa.trainer import run_pretraining

    cfg = tiny_config(optimisation={"total_steps": 2, "batch_size": 4, "warmup_steps": 1}, checkpoint_every=10,
                      data={"mode": "stream", "shuffle_buffer": 4}, num_workers=1)
    s = run_pretraining(cfg, f"{http_root}/good", tmp_path / "run")
    assert s["steps"] == 2 and s["data_mode"] == "stream" and s["batches_per_rank"] == [2]
    assert s["img_size"] == 32 and np.isfinite(s["final_loss"])
    with pytest.raises(ShardError, match=r"/bad/.* sha256 .* does not match"):
        run_pretraining({**cfg, "data": {"mode": "memory"}}, f"{http_root}/bad", tmp_path / "bad")
