"""precision "auto": bf16 where the hardware multiplies bf16 natively, fp32 elsewhere; bf16
feature extraction stays close to fp32 and is cached apart from it."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_encoder_config
from ijepa import features as feats_mod
from ijepa import precision
from ijepa.models import ViTEncoder


@pytest.fixture
def native_bf16(monkeypatch):
    def set_native(value: bool) -> None:
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: value)
    return set_native


def test_auto_resolves_by_device_and_cpu_capability(native_bf16):
    native_bf16(True)
    assert precision.resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert precision.resolve_precision("auto", "cuda") == "bf16"
    native_bf16(False)
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    assert precision.resolve_precision("auto", "cuda") == "bf16"
    for explicit in ("fp32", "bf16"):  # an explicit choice is never overridden
        assert precision.resolve_precision(explicit, "cpu") == explicit


def test_autocast_follows_the_resolved_precision(native_bf16):
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    native_bf16(False)
    with precision.autocast_for("auto", "cpu"):
        assert (a @ b).dtype == torch.float32
    native_bf16(True)
    with precision.autocast_for("auto", "cpu"):
        assert (a @ b).dtype == torch.bfloat16


def test_cpu_capability_probe_returns_a_bool():
    precision.cpu_has_native_bf16.cache_clear()
    assert isinstance(precision.cpu_has_native_bf16(), bool)


def test_bf16_features_close_to_fp32_and_cached_apart(tmp_path):
    torch.manual_seed(0)
    enc = ViTEncoder(tiny_encoder_config())
    images = torch.randint(0, 256, (24, 1, 16, 16), dtype=torch.uint8)
    full = feats_mod.extract_features(enc, images, n_last=1, batch_size=8, progress=False, precision="fp32")
    low = feats_mod.extract_features(enc, images, n_last=1, batch_size=8, progress=False, precision="bf16")
    assert low.dtype == torch.float32 and low.shape == full.shape
    rel = (low - full).norm() / full.norm()
    assert 0 < rel < 0.05  # bf16 really ran (not bit-equal) and stays within bf16 rounding
    kw = dict(n_last=1, cache_dir=tmp_path, data_fingerprint="fp", batch_size=8, progress=False)
    a = feats_mod.encoder_features(enc, "key", images, "train", precision="fp32", **kw)
    b = feats_mod.encoder_features(enc, "key", images, "train", precision="bf16", **kw)
    assert torch.equal(a, full) and torch.equal(b, low)  # another precision is not served from the cache
    assert torch.equal(feats_mod.encoder_features(enc, "key", images, "train", precision="bf16", **kw), low)


def test_probe_precision_is_validated_by_name():
    from ijepa.config import ConfigError, from_mapping
    from ijepa.probes import ProbeConfig

    with pytest.raises(ConfigError, match=r"probe\.precision: 'fp16' is not one of"):
        from_mapping(ProbeConfig, {"precision": "fp16"}, "probe")
    assert from_mapping(ProbeConfig, {}, "probe").precision == "auto"
