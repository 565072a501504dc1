"""Pretraining loop: config checks, param groups, EMA, loss decrease, NaN stop, resume rules,
monitoring, data readers and augmentation (tiny models, CPU, in-process)."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from ijepa import checkpoint as ckpt
from ijepa.config import ConfigError
from ijepa.export import load_encoder
from ijepa.masks import MaskConfig, MaskGenerator, make_generator
from ijepa.models import EncoderConfig, Predictor, PredictorConfig, ViTEncoder
from ijepa.monitor import CSV_COLUMNS, LossHistory, collapse_stats, effective_rank
from ijepa.tracking import RecordingTracker
from ijepa.methods.ijepa import ContextPath, ema_update_, target_tokens
from ijepa.precision import Fp32CoreAttention, adapt_for_precision
from ijepa.train_config import load_config
from ijepa.trainer import NonFiniteLossError, ResumeMismatchError, Trainer, prepare, run_pretraining
from ijepa.trainer.optim import apply_schedules, build_optimizer, param_groups
from ijepa.train_data import Augmenter, MemoryBatches, StreamBatches, crop_params, read_shard_info, resized_crops
from conftest import make_shards, tiny_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), n=64, size=16, channels=1)


# ------------------------------------------------------------------------------- config
def test_image_size_not_divisible_by_patch_names_both_values(tmp_path):
    odd = make_shards(tmp_path / "odd", n=8, size=30, channels=1)
    with pytest.raises(ConfigError, match=r"model\.patch_size: image size 30 .* not divisible by patch_size 4"):
        run_pretraining(tiny_config(), odd, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # checked before any work


@pytest.mark.parametrize("over, needle", [
    ({"optimisation": {"lr": "fast"}}, r"pretrain\.optimisation\.lr"),
    ({"optimisation": {"batch_size": 6}, "nproc": 4}, r"batch_size 6 is not divisible by nproc 4"),
    ({"loss": "l3"}, r"pretrain\.loss"),
    ({"model": {"preset": "vit_z"}}, r"unknown preset"),
    ({"model": {"encoder": {"img_size": 32}}}, r"pretrain\.model\.encoder: unknown field\(s\) \['img_size'\]"),
    ({"augmentation": {"scale": [0.5, 0.2]}}, r"scale must satisfy"),
    ({"masks": {"npred": 0}}, r"npred must be an integer >= 1"),
    ({"bogus": 1}, r"unknown field\(s\) \['bogus'\]"),
])
def test_config_errors_name_fields(over, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(tiny_config(**over))


def test_altered_shards_are_refused_before_training(tmp_path):
    from ijepa.data import ShardError

    root = make_shards(tmp_path / "s", n=16, size=16, channels=1, per_shard=8)
    with open(root / "train-000001.tar", "r+b") as fh:
        fh.seek(700)
        fh.write(b"X")
    with pytest.raises(ShardError, match=r"train-000001\.tar sha256"):
        run_pretraining(tiny_config(), root, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_checks_against_data_name_fields(shards, tmp_path):
    with pytest.raises(ConfigError, match=r"optimisation\.batch_size: 128 is larger than the train split"):
        run_pretraining(tiny_config(optimisation={"batch_size": 128}), shards, tmp_path / "a")
    with pytest.raises(ConfigError, match=r"masks: .*min_keep=40"):
        run_pretraining(tiny_config(masks={"min_keep": 40}), shards, tmp_path / "b")
    with pytest.raises(ConfigError, match=r"model\.encoder: embed_dim 30 is not divisible by num_heads 4"):
        run_pretraining(tiny_config(model={"encoder": {"embed_dim": 30, "num_heads": 4}}), shards, tmp_path / "c")


# ------------------------------------------------------------------------- building blocks
ENC = EncoderConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
PRED = PredictorConfig(embed_dim=16, depth=1, num_heads=2)


def test_param_groups_no_decay_on_bias_and_1d():
    enc, pred = ViTEncoder(ENC), Predictor(ENC, PRED)
    decay, no_decay = param_groups(enc, pred)
    names = {id(p): n for m in (enc, pred) for n, p in m.named_parameters()}
    assert no_decay["wd_exclude"] and no_decay["weight_decay"] == 0.0 and not decay["wd_exclude"]
    assert all(names[id(p)].endswith("bias") or p.ndim == 1 for p in no_decay["params"])
    assert all(p.ndim >= 2 and not names[id(p)].endswith("bias") for p in decay["params"])
    assert any(names[id(p)].endswith("norm.weight") for p in no_decay["params"])  # LayerNorm gains
    assert any(names[id(p)] == "mask_token" for p in decay["params"])  # 3-D, as in the reference
    all_ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(enc.parameters())) + len(list(pred.parameters()))
    opt = build_optimizer(load_config({}), enc, pred)
    apply_schedules(opt, lr=0.5, weight_decay=0.3)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.5, 0.3), (0.5, 0.0)]


def test_ema_update_math():
    torch.manual_seed(0)
    online, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update_(target, online, 0.9)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o.detach(), rtol=1e-6, atol=1e-7)
    ema_update_(target, online, 1.0)  # momentum 1 = frozen
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o.detach(), rtol=1e-6, atol=1e-7)


def test_one_step_target_gets_no_grad_and_moves_by_ema(shards, tmp_path):
    cfg = load_config(tiny_config(optimisation={"total_steps": 1}))
    tr = Trainer(prepare(cfg, shards), tmp_path / "run")
    tr.build()
    m_ = tr.method
    enc0 = {k: v.clone() for k, v in m_.encoder.state_dict().items()}
    tgt0 = {k: v.clone() for k, v in m_.target_encoder.state_dict().items()}
    assert all(torch.equal(enc0[k], tgt0[k]) for k in enc0)  # target starts as a copy
    assert not any(p.requires_grad for p in m_.target_encoder.parameters())
    m = tr.schedules.at(0)["momentum"]
    tr.train_step(0)
    assert all(p.grad is None for p in m_.target_encoder.parameters())
    assert all(p.grad is not None for p in m_.encoder.parameters())
    for k, v in m_.target_encoder.state_dict().items():
        torch.testing.assert_close(v, m * tgt0[k] + (1 - m) * m_.encoder.state_dict()[k], rtol=1e-5, atol=1e-7)
    assert not torch.equal(m_.encoder.state_dict()["blocks.0.attn.qkv.weight"], enc0["blocks.0.attn.qkv.weight"])


def test_context_path_with_two_context_blocks_matches_per_block_calls():
    torch.manual_seed(0)
    enc, pred = ViTEncoder(ENC).eval(), Predictor(ENC, PRED).eval()
    gen = MaskGenerator(MaskConfig(npred=2, pred_scale=(0.15, 0.25), nenc=2, enc_scale=(0.6, 0.9), min_keep=3),
                        ENC.grid)
    m = gen(3, make_generator(0, 1))
    imgs = torch.rand(3, 1, 16, 16)
    out = ContextPath(enc, pred)(imgs, m.context, m.targets)
    assert out.shape == (2 * 2 * 3, m.targets.shape[-1], 32)
    ref = [pred(enc(imgs, keep=m.context[k]), m.context[k], m.targets) for k in range(2)]  # [M*B] each
    ref = torch.stack([r.view(2, 3, -1, 32) for r in ref], dim=1).reshape(12, -1, 32)  # (m, k, b)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    h = enc(imgs)
    tg = target_tokens(h, m.targets, nenc=2).view(2, 2, 3, -1, 32)
    torch.testing.assert_close(tg[:, 0], tg[:, 1])  # the same targets for each context block
    hn = torch.nn.functional.layer_norm(h, (32,))
    torch.testing.assert_close(tg[1, 0, 2], hn[2, m.targets[1, 2]])


# ---------------------------------------------------------------------------- training runs
def test_loss_decreases_and_outputs(shards, tmp_path):
    tracker = RecordingTracker()
    csv_path = tmp_path / "plots" / "pretrain_loss.csv"
    cfg = tiny_config(optimisation={"total_steps": 40, "warmup_steps": 4, "lr": 2e-3}, log_every=4,
                      checkpoint_every=20, deterministic=False)
    s = run_pretraining(cfg, shards, tmp_path / "run", tracker=tracker, loss_csv=csv_path)
    rows = LossHistory.read_csv(csv_path)
    assert [int(r["step"]) for r in rows] == list(range(4, 41, 4))
    first, last = rows[0]["loss"], min(r["loss"] for r in rows[-3:])
    assert last < 0.8 * first, f"loss did not decrease: {first} -> {last}"
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert s["steps"] == 40 and s["batches_per_rank"] == [40] and s["final_loss"] == pytest.approx(rows[-1]["loss"])
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"checkpoints", "encoder", "loss.png", "summary.json", "config.json"}
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [20, 40]
    state = torch.load(run / "checkpoints" / "ckpt-00000040.pt", weights_only=True)
    assert {"encoder", "predictor", "target_encoder", "optimizer", "schedules", "rng", "data", "config",
            "history", "step", "epoch"} <= set(state)
    assert state["data"] == {"mode": "memory", "epoch": 5, "batch": 0, "steps_per_epoch": 8, "global_batch": 8,
                             "world_size": 1, "seed": 3}
    enc = load_encoder(run / "encoder")  # the exported TARGET encoder
    for k, v in enc.state_dict().items():
        assert torch.equal(v, state["target_encoder"][k])
    meta = json.loads((run / "encoder" / "encoder.json").read_text())["metadata"]
    assert meta["step"] == 40 and meta["dataset"] == "blobs" and len(meta["manifest_sha256"]) == 64
    assert meta["config"]["optimisation"]["total_steps"] == 40
    names = set().union(*(m for _, m in tracker.metrics))
    assert {"loss", "lr", "weight_decay", "ema_momentum", "img_per_s", "grad_norm", "target_std",
            "effective_rank"} <= names
    assert tracker.params["optimisation.lr"] == "0.002" and tracker.tags["pretrain_status"] == "finished"
    # running again finds the finished run: no training, same weights re-exported
    again = run_pretraining(cfg, shards, tmp_path / "run", loss_csv=csv_path)
    assert again["resumed_from_step"] == 40 and LossHistory.read_csv(csv_path) == rows


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(shards, tmp_path, nan_loss_at):
    nan_loss_at(7)
    tracker = RecordingTracker()
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 7 of 12.*ckpt-00000004\.pt"):
        run_pretraining(tiny_config(), shards, tmp_path / "run", tracker=tracker)
    run = tmp_path / "run"
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [4]
    assert ckpt.load_latest(run / "checkpoints")[1]["step"] == 4
    assert not (run / "encoder").exists()
    assert [int(r["step"]) for r in LossHistory.read_csv(run / "loss.csv")] == [2, 4, 6]
    assert tracker.tags["pretrain_status"].startswith("failed: loss is nan at step 7")


def test_resume_with_contradicting_config_is_refused(shards, tmp_path):
    run_pretraining(tiny_config(optimisation={"total_steps": 4}), shards, tmp_path / "run")
    with pytest.raises(ResumeMismatchError, match=r"optimisation\.lr: checkpoint has 0\.001, config has 0\.005"):
        run_pretraining(tiny_config(optimisation={"total_steps": 4, "lr": 5e-3}), shards, tmp_path / "run")
    with pytest.raises(ResumeMismatchError, match=r"optimisation\.total_steps"):
        run_pretraining(tiny_config(optimisation={"total_steps": 8}), shards, tmp_path / "run")
    # operational fields may change
    s = run_pretraining(tiny_config(optimisation={"total_steps": 4}, log_every=1, keep_last=5), shards,
                        tmp_path / "run")
    assert s["resumed_from_step"] == 4


def test_collapse_warning_logged_and_tagged(shards, tmp_path, caplog):
    tracker = RecordingTracker()
    with caplog.at_level(logging.WARNING, logger="ijepa.trainer"):
        run_pretraining(tiny_config(optimisation={"total_steps": 2}, collapse={"rank_min": 1e6}),
                        shards, tmp_path / "run", tracker=tracker)
    assert "possible representation collapse at step 2" in caplog.text
    assert "effective_rank=" in tracker.tags["collapse_warning"]


def test_collapse_stats_detect_collapse():
    torch.manual_seed(0)
    healthy = torch.randn(64, 16, 32)
    collapsed = torch.randn(1, 16, 32).expand(64, -1, -1) + 1e-6 * torch.randn(64, 16, 32)
    h, c = collapse_stats(healthy), collapse_stats(collapsed)
    assert h["target_std"] > 0.1 and c["target_std"] < 1e-4
    assert h["effective_rank"] > 20 and c["effective_rank"] < 1.1
    assert effective_rank(torch.eye(8)) == pytest.approx(8.0)


def test_bf16_and_smooth_l1_and_two_context_blocks_run(shards, tmp_path):
    cfg = tiny_config(optimisation={"total_steps": 3}, precision="bf16", loss="smooth_l1", deterministic=False,
                      masks={"nenc": 2, "enc_scale": [0.6, 0.9]}, checkpoint_every=10)
    s = run_pretraining(cfg, shards, tmp_path / "run")
    assert s["precision"] == "bf16" and math.isfinite(s["final_loss"])
    enc = load_encoder(tmp_path / "run" / "encoder")  # fp32-core attention left the weights' names alone
    assert enc(torch.rand(2, 1, 16, 16)).shape == (2, 16, 32)


def test_fp32_core_attention_matches_timm_attention():
    torch.manual_seed(0)
    enc = ViTEncoder(ENC).eval()
    keys = list(enc.state_dict())
    x = torch.rand(3, 1, 16, 16)
    keep = torch.stack([torch.randperm(16)[:9].sort().values for _ in range(3)])
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[1, 6:] = False
    ref = enc(x, keep=keep, keep_valid=valid)
    adapt_for_precision(enc, "bf16", torch.device("cpu"))
    assert all(isinstance(b.attn, Fp32CoreAttention) for b in enc.blocks)
    assert list(enc.state_dict()) == keys
    torch.testing.assert_close(enc(x, keep=keep, keep_valid=valid), ref, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = enc(x, keep=keep, keep_valid=valid)
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------ data and crops
def test_memory_batches_split_ranks_equally_and_cover_the_global_batch(shards):
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 2, 2).contiguous()
    one = MemoryBatches(images, batch_size=8, rank=0, world_size=1, seed=5)
    r0, r1 = (MemoryBatches(images, 8, r, 2, 5) for r in (0, 1))
    assert one.steps_per_epoch == r0.steps_per_epoch == r1.steps_per_epoch == 2  # tail of 4 dropped
    for epoch in (0, 1):
        for b1, b0, bb in zip(one.batches(epoch), r0.batches(epoch), r1.batches(epoch)):
            assert torch.equal(b1, torch.cat([b0, bb]))
    assert not torch.equal(one.permutation(0), one.permutation(1))
    assert torch.equal(next(iter(one.batches(1, start=1))), list(one.batches(1))[1])  # skip-ahead


def test_stream_batches_equal_per_rank_deterministic_and_skip_ahead(shards):
    info = read_shard_info(shards)
    ranks = [StreamBatches(info, batch_size=8, rank=r, world_size=2, seed=1, shuffle_buffer=16) for r in (0, 1)]
    epochs = [[b.clone() for b in s.batches(0)] for s in ranks]
    assert [len(e) for e in epochs] == [8, 8]  # 64 images // 8 per step, on every rank
    assert all(b.shape == (4, 1, 16, 16) and b.dtype == torch.uint8 for e in epochs for b in e)
    again = list(ranks[0].batches(0))
    assert all(torch.equal(a, b) for a, b in zip(again, epochs[0]))
    assert all(torch.equal(a, b) for a, b in zip(ranks[0].batches(0, start=5), epochs[0][5:]))
    assert not torch.equal(torch.stack(epochs[0]), torch.stack(epochs[1]))


def test_stream_mode_run(shards, tmp_path):
    s = run_pretraining(tiny_config(optimisation={"total_steps": 3}, data={"mode": "stream"}, checkpoint_every=10),
                        shards, tmp_path / "run")
    assert s["data_mode"] == "stream" and s["batches_per_rank"] == [3]


def test_random_resized_crop_params_and_identity():
    g = torch.Generator().manual_seed(0)
    boxes = crop_params(500, 16, 24, (0.3, 1.0), (3 / 4, 4 / 3), g)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 16).all() and (left + w <= 24).all()
    area = h * w / (16 * 24)
    assert area.min() >= 0.25 and area.max() <= 1.0 and area.std() > 0.1
    assert ((w / h) >= 0.7).all() and ((w / h) <= 1.4).all()
    x = torch.rand(2, 3, 16, 24)
    full = torch.tensor([[0, 0, 16, 24], [0, 0, 16, 24]])
    torch.testing.assert_close(resized_crops(x, full), x, rtol=0, atol=1e-5)
    half = resized_crops(x, torch.tensor([[0, 0, 8, 12], [8, 12, 8, 12]]))
    torch.testing.assert_close(half[0, :, ::2, ::2], torch.nn.functional.interpolate(
        x[:1, :, :8, :12], size=(16, 24), mode="bilinear", align_corners=False)[0, :, ::2, ::2], rtol=0, atol=1e-5)
    aug = Augmenter(True, (0.3, 1.0), (3 / 4, 4 / 3), seed=0, global_batch=4, rank=1, world_size=2)
    u8 = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    a, b = aug(u8, step=3), aug(u8, step=3)
    assert torch.equal(a, b) and not torch.equal(a, aug(u8, step=4))
    assert a.dtype == torch.float32 and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    off = Augmenter(False, (0.3, 1.0), (3 / 4, 4 / 3), 0, 4, 1, 2)
    assert torch.equal(off(u8, 3), u8.float() / 255)
