"""MAE baseline (`method: mae`, ijepa.methods.mae) in the shared trainer: masking, loss on masked
patches only, loss decrease, checkpoint resume, export + probes, config errors (tiny, CPU)."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed

from ijepa.config import ConfigError
from ijepa.export import load_encoder
from ijepa.methods import get_method
from ijepa.methods.ijepa import IJepa
from ijepa.methods.mae import Mae, MaeDecoder, MaeOptions, MaePath, RandomMaskGenerator, forward_mae, mae_loss, patchify
from ijepa.masks import make_generator
from ijepa.models import EncoderConfig, ViTEncoder
from ijepa.train_config import load_config
from ijepa.trainer import ResumeMismatchError, run_pretraining
from conftest import make_shards, tiny_config

MAE = {"mask_ratio": 0.75, "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}
ENC = EncoderConfig(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2)


def mae_config(**over) -> dict:
    opts = {**MAE, **over.pop("method_options", {})}
    return tiny_config(**{"method": "mae", **over, "method_options": opts})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("mae_shards"), n=64, size=16, channels=1)


def test_random_masks_partition_the_grid_and_follow_the_seed():
    gen = RandomMaskGenerator(0.75, (4, 4))
    m = gen(8, make_generator(0, 5))
    assert m.context.shape == (1, 8, 4) and m.targets.shape == (1, 8, 12)  # int(16 * 0.25) visible
    for b in range(8):
        both = torch.cat([m.context[0, b], m.targets[0, b]])
        assert torch.equal(both.sort().values, torch.arange(16))  # disjoint, covering every patch
    assert torch.equal(m.context, gen(8, make_generator(0, 5)).context)
    assert not torch.equal(m.context, gen(8, make_generator(0, 6)).context)


def test_patchify_matches_patch_embed_token_order():
    x = torch.rand(2, 3, 16, 16)
    pe = PatchEmbed(16, 4, 3, 4 * 4 * 3)
    # a conv with an identity-like kernel: output channel k reads input (c, i, j) at k = (i*4 + j)*3 + c
    w = torch.zeros(48, 3, 4, 4)
    for i in range(4):
        for j in range(4):
            for c in range(3):
                w[(i * 4 + j) * 3 + c, c, i, j] = 1.0
    pe.proj.weight.data.copy_(w)
    pe.proj.bias.data.zero_()
    assert torch.allclose(pe(x), patchify(x, 4), atol=1e-6)


def test_loss_counts_only_masked_patches():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    masks = RandomMaskGenerator(0.75, ENC.grid)(2, make_generator(1, 1))
    visible, masked = masks.context[0], masks.targets[0]
    pred = torch.randn(2, masked.shape[1], 48)
    base = mae_loss(pred, images, masked, 4)
    # changing the pixels of VISIBLE patches does not change the loss ...
    changed = patchify(images, 4).clone()
    changed.scatter_(1, visible[..., None].expand(-1, -1, 48), torch.rand(2, visible.shape[1], 48))
    img2 = changed.reshape(2, 4, 4, 4, 4, 3).permute(0, 5, 1, 3, 2, 4).reshape(2, 3, 16, 16)
    assert torch.equal(patchify(img2, 4).gather(1, masked[..., None].expand(-1, -1, 48)),
                       patchify(images, 4).gather(1, masked[..., None].expand(-1, -1, 48)))
    assert torch.allclose(mae_loss(pred, img2, masked, 4), base)
    # ... changing one masked patch does
    img3 = images.clone()
    p = int(masked[0, 0])
    r, c = divmod(p, 4)
    img3[0, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] = torch.rand(3, 4, 4)
    assert not torch.allclose(mae_loss(pred, img3, masked, 4), base)
    # norm_pix: targets normalised per patch; without it, raw pixels
    tgt = patchify(images, 4).gather(1, masked[..., None].expand(-1, -1, 48))
    assert torch.allclose(mae_loss(pred, images, masked, 4, norm_pix=False), F.mse_loss(pred, tgt))


def test_encoder_sees_visible_patches_only_and_decoder_predicts_masked():
    torch.manual_seed(0)
    enc = ViTEncoder(ENC)
    path = MaePath(enc, MaeDecoder(ENC, MaeOptions(**MAE)))
    images = torch.rand(2, 3, 16, 16)
    masks = RandomMaskGenerator(0.75, ENC.grid)(2, make_generator(2, 2))
    loss, z = forward_mae(path, images, masks, 4)
    assert z.shape == (2, 4, 32) and loss.ndim == 0 and torch.isfinite(loss)
    # masked pixels do not reach the encoder: the encoder output is unchanged when they change
    img2 = images.clone()
    for b in range(2):
        for p in masks.targets[0, b].tolist():
            r, c = divmod(p, 4)
            img2[b, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] = 0.0
    _, z2 = forward_mae(path, img2, masks, 4)
    assert torch.allclose(z, z2, atol=1e-6)


def test_mae_loss_decreases_and_exports_the_encoder(shards, tmp_path):
    assert get_method(load_config(mae_config()).method) is Mae
    assert get_method(load_config(tiny_config()).method) is IJepa
    # raw-pixel targets here: on 4x4-pixel patches of smooth blobs the per-patch normalised
    # targets are mostly noise-like, which makes the decrease slow for a test
    cfg = mae_config(optimisation={"total_steps": 40, "warmup_steps": 4, "lr": 2e-3}, log_every=5,
                     checkpoint_every=20, deterministic=False, method_options={"norm_pix_loss": False})
    summary = run_pretraining(cfg, shards, tmp_path / "run")
    with open(summary["loss_csv"]) as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh)]
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses
    assert summary["method"] == "mae" and summary["decoder_params"] > 0 and "predictor_params" not in summary
    state = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)
    assert {"encoder", "decoder"} <= set(state) and "target_encoder" not in state and "predictor" not in state
    enc = load_encoder(summary["encoder_dir"])
    assert enc.cfg.embed_dim == 32 and enc.cfg.depth == 2
    info = json.loads((tmp_path / "run" / "encoder" / "encoder.json").read_text())
    assert info["metadata"]["source"] == "ijepa.methods.mae (Mae.export_encoder)"
    assert info["metadata"]["config"]["method"] == "mae"
    # the exported weights are the trained encoder's
    torch.testing.assert_close(enc.state_dict()["patch_embed.proj.weight"], state["encoder"]["patch_embed.proj.weight"])


def test_mae_resume_continues_the_same_run(shards, tmp_path):
    cfg = mae_config(optimisation={"total_steps": 12, "warmup_steps": 2})
    full = run_pretraining(cfg, shards, tmp_path / "full")

    class Stop(Exception):
        pass

    def stop_at_8(step, encoder):
        assert isinstance(encoder, ViTEncoder)
        if step == 8:
            raise Stop

    with pytest.raises(Stop):
        run_pretraining(cfg, shards, tmp_path / "cut", on_checkpoint=stop_at_8)
    resumed = run_pretraining(cfg, shards, tmp_path / "cut")
    assert resumed["resumed_from_step"] == 8 and resumed["steps"] == 12
    a = load_encoder(full["encoder_dir"]).state_dict()
    b = load_encoder(resumed["encoder_dir"]).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # an I-JEPA config cannot resume an MAE run folder
    with pytest.raises(ResumeMismatchError, match=r"method: checkpoint has 'mae', config has 'ijepa'"):
        run_pretraining(tiny_config(optimisation={"total_steps": 16, "warmup_steps": 2}), shards, tmp_path / "cut")


def test_mae_encoder_probes_run_unchanged(tmp_path):
    from ijepa.data import shard_dataset
    from ijepa.probes import run_probes

    data = tmp_path / "scenes"
    shard_dataset({"source": "scenes", "image_size": 16, "scenes": {"sizes": {"train": 48, "val": 16, "test": 16}}},
                  data, progress=False)
    cfg = mae_config(optimisation={"batch_size": 16, "total_steps": 4, "warmup_steps": 1}, precision="bf16")
    summary = run_pretraining(cfg, data, tmp_path / "run")
    metrics, _ = run_probes({"max_iter": 10, "weight_decays": [1e-2], "lowshot_per_class": 1, "lowshot_seeds": 2,
                             "baselines": ["random_init"], "feature_batch_size": 16},
                            summary["encoder_dir"], data, tmp_path / "cache", progress=False)
    for probe in ("linear", "lowshot", "count", "depth"):
        assert 0.0 <= metrics["probes"][probe]["ijepa"] <= 1.0
        assert "random_init" in metrics["probes"][probe]


@pytest.mark.parametrize("over, needle", [
    ({"method": "byol"}, r"pretrain: method: unknown method 'byol'; choose one of \['ijepa', 'mae'\]"),
    ({"method_options": {"mask_ratio": 1.0}}, r"pretrain: method_options: mask_ratio must be in \(0, 1\)"),
    ({"method_options": {"decoder_dim": 30, "decoder_heads": 4}},
     r"pretrain: method_options: decoder_dim 30 is not divisible by decoder_heads 4"),
    ({"method_options": {"decoder_depth": 0}}, r"pretrain: method_options: decoder_depth must be >= 1"),
    ({"method_options": {"ratio": 0.5}}, r"pretrain: method_options: unknown field\(s\) \['ratio'\]"),
    ({"method_options": {"norm_pix_loss": "yes"}}, r"pretrain: method_options\.norm_pix_loss"),
    ({"method": "ijepa", "method_options": {"mask_ratio": 0.5}},
     r"pretrain: method_options: method 'ijepa' takes no options, got \['mask_ratio'\]"),
])
def test_mae_config_errors_name_fields(over, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config({**mae_config(), **over} if "method" in over else mae_config(**dict(over)))


def test_mae_mask_ratio_checked_against_the_grid(shards, tmp_path):
    # 16 px / patch 4 = 4x4 grid: ratio 0.95 leaves int(16 * 0.05) = 0 visible patches
    with pytest.raises(ConfigError, match=r"method_options\.mask_ratio: 0\.95 on the 4x4 patch grid leaves 0 of 16"):
        run_pretraining(mae_config(method_options={"mask_ratio": 0.95}), shards, tmp_path / "run")
    assert not (tmp_path / "run").exists()
