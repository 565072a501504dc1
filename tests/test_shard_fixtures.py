"""The shared pretraining test helpers (`conftest.make_shards`, `blob_images`) read back."""
from __future__ import annotations

import torch

from conftest import blob_images, make_shards


def test_fixture_shards_read_back(tmp_path):
    from ijepa.data import verify_shards
    from ijepa.train_data import load_train_images, read_shard_info

    grey = make_shards(tmp_path / "g", n=40, size=12, channels=1, per_shard=16)
    verify_shards(grey)
    info = read_shard_info(grey, verify=True)
    assert (info.image_size, info.channels, info.train_samples, len(info.train_shards)) == (12, 1, 40, 3)
    imgs = load_train_images(info)
    assert imgs.dtype == torch.uint8 and tuple(imgs.shape) == (40, 1, 12, 12)
    assert torch.equal(imgs, torch.from_numpy(blob_images(40, 12, 1)).permute(0, 3, 1, 2))
    rgb = read_shard_info(make_shards(tmp_path / "c", n=20, size=16, channels=3, per_shard=8))
    assert (rgb.image_size, rgb.channels, rgb.train_samples, rgb.dataset) == (16, 3, 20, "scenes")
    assert tuple(load_train_images(rgb).shape) == (20, 3, 16, 16)
