"""Typed config, atomic writes, ViT encoder/predictor semantics, encoder export."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from ijepa import atomic, load_encoder
from ijepa.config import ConfigError, as_dict, deep_merge, from_mapping, require
from ijepa.export import EncoderFileError, save_encoder
from conftest import tiny_encoder_config
from ijepa.models import EncoderConfig, Predictor, PredictorConfig, ViTEncoder, preset

TINY = tiny_encoder_config()
TINY_PRED = PredictorConfig(embed_dim=16, depth=1, num_heads=2)


@dataclass(frozen=True)
class Inner:
    k: int = 1

    def validate(self):
        require(self.k > 0, f"k must be positive, got {self.k}")


@dataclass(frozen=True)
class Outer:
    name: str
    scale: tuple[float, float] = (0.1, 0.2)
    inner: Inner = field(default_factory=Inner)


def test_config_builds_nested_and_coerces_tuples():
    cfg = from_mapping(Outer, {"name": "a", "scale": [0.2, 0.3], "inner": {"k": 3}})
    assert cfg == Outer("a", (0.2, 0.3), Inner(3))
    assert as_dict(cfg) == {"name": "a", "scale": [0.2, 0.3], "inner": {"k": 3}}


@pytest.mark.parametrize("mapping, needle", [
    ({"name": "a", "bogus": 1}, "bogus"),
    ({}, "Outer.name"),
    ({"name": 3}, "Outer.name"),
    ({"name": "a", "scale": [0.1]}, "Outer.scale"),
    ({"name": "a", "inner": {"k": True}}, "inner.k"),
    ({"name": "a", "inner": {"k": -1}}, "k must be positive"),
])
def test_config_errors_name_the_field(mapping, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        from_mapping(Outer, mapping)


def test_deep_merge_overrides_leaves_only():
    base = {"a": {"b": 1, "c": 2}, "d": [1]}
    assert deep_merge(base, {"a": {"c": 5}, "d": [2]}) == {"a": {"b": 1, "c": 5}, "d": [2]}
    assert base == {"a": {"b": 1, "c": 2}, "d": [1]}


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "m.json"
    atomic.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed mid-write")
    assert target.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_atomic_write_gives_the_mode_a_plain_write_gives(tmp_path):
    atomic.write_json(tmp_path / "m.json", {"v": 1})
    (tmp_path / "plain.json").write_text("{}")  # open() with this process's umask
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "m.json") == mode(tmp_path / "plain.json")  # not mkstemp's 0600


def test_encoder_config_rejects_indivisible_image():
    with pytest.raises(ConfigError, match="img_size 30 is not divisible by patch_size 4"):
        ViTEncoder(EncoderConfig(img_size=30, patch_size=4))
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("vit_z")


def test_positions_are_added_before_the_gather():
    # Attention is permutation-equivariant: if positions travel with their tokens (added
    # before gathering), encoding a permutation of all patches permutes the output.
    torch.manual_seed(0)
    enc = ViTEncoder(TINY).eval()
    x = torch.rand(2, 1, 16, 16)
    full = enc(x)
    perm = torch.stack([torch.randperm(16), torch.randperm(16)])
    permuted = enc(x, keep=perm)
    expected = torch.stack([full[i, perm[i]] for i in range(2)])
    assert torch.allclose(permuted, expected, atol=1e-5)
    # ...and a subset only sees its own tokens: changing a dropped patch changes nothing.
    keep = torch.tensor([[0, 1, 2, 3]] * 2)
    x2 = x.clone()
    x2[:, :, 12:, 12:] = 1.0  # patch 15, not kept
    assert torch.allclose(enc(x, keep=keep), enc(x2, keep=keep), atol=1e-6)


def test_predictor_output_order_is_block_major():
    torch.manual_seed(0)
    pred = Predictor(TINY, TINY_PRED).eval()
    ctx_idx = torch.tensor([[0, 1, 2], [4, 5, 6]])
    ctx = torch.randn(2, 3, 32)
    tgt = torch.tensor([[[8, 9], [10, 11]], [[12, 13], [14, 15]]])  # [M=2, B=2, Nt=2]
    out = pred(ctx, ctx_idx, tgt)
    assert out.shape == (4, 2, 32)
    # block m of image b sits at m * B + b: compare with a one-block call
    one = pred(ctx[1:], ctx_idx[1:], tgt[1:, 1:])
    assert torch.allclose(out[1 * 2 + 1], one[0], atol=1e-5)


def test_features_concatenate_last_layers():
    enc = ViTEncoder(TINY).eval()
    x = torch.rand(2, 1, 16, 16)
    assert enc.features(x, 1).shape == (2, 32)
    f2 = enc.features(x, 2)
    assert f2.shape == (2, 64) and torch.allclose(f2[:, 32:], enc.features(x, 1), atol=1e-6)


def test_encoder_export_round_trip_and_errors(tmp_path):
    enc = ViTEncoder(TINY)
    save_encoder(enc, tmp_path / "enc", metadata={"dataset": "unit"})
    loaded = load_encoder(tmp_path / "enc")
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded(x), enc.eval()(x))
    assert loaded.cfg == TINY and not any(p.requires_grad for p in loaded.parameters())
    weights = tmp_path / "enc" / "encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    with pytest.raises(EncoderFileError, match="encoder.safetensors"):
        load_encoder(tmp_path / "enc")
    with pytest.raises(EncoderFileError, match="nowhere"):
        load_encoder(tmp_path / "nowhere")


def test_padded_context_matches_unpadded_lists():
    # Variable-length context lists padded to a common length give, on their valid
    # entries, exactly what each list gives alone (padding is masked out of attention).
    torch.manual_seed(0)
    enc = ViTEncoder(TINY).eval()
    pred = Predictor(TINY, TINY_PRED).eval()
    x = torch.rand(2, 1, 16, 16)
    short, long_ = torch.tensor([1, 4, 6]), torch.tensor([0, 2, 3, 7, 9])
    keep = torch.stack([torch.cat([short, torch.zeros(2, dtype=torch.long)]), long_])
    valid = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    padded = enc(x, keep, keep_valid=valid)
    alone = enc(x[:1], short[None])
    assert torch.allclose(padded[0, :3], alone[0], atol=1e-5)
    tgt = torch.tensor([[[10, 11], [12, 13]]])
    p_pad = pred(padded, keep, tgt, ctx_valid=valid)
    p_alone = pred(alone, short[None], tgt[:, :1])
    assert torch.allclose(p_pad[0], p_alone[0], atol=1e-5)
