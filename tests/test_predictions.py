"""What the predictor predicts (ijepa.decoder, ijepa.predictions, ijepa.viz.predictions, the
pretrain pipeline's visualise_predictions node): on a tiny I-JEPA pretrained here for a few dozen
steps, a patch decoder trained on train images' target features reconstructs held-out patches,
decoded predictions of masked target blocks beat the mean-patch baseline, the figure shows the
expected panels, and bad parameters fail before any work."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_MASKS, tiny_config
from ijepa import checkpoint as ckpt
from ijepa.config import ConfigError
from ijepa.decoder import DecoderConfig, decode_mse, fit_decoder, patchify, unpatchify
from ijepa.params import pretrain_mapping, read_parameters, visualise_mapping
from ijepa.predictions import (VisualiseConfig, first_images, load_ijepa, report_for_checkpoint, save_report,
                               skip_reason, token_pool, visualise_config)
from ijepa.viz.predictions import COLUMNS

SMALL = VisualiseConfig(train_images=128, eval_images=48, images=3, batch_size=16,
                        decoder=DecoderConfig(hidden=128, steps=200, batch_size=256, lr=3e-3))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(plan, final checkpoint, run folder) of a tiny I-JEPA pretrained for 150 steps on 16-px scenes with a
    val split (about 2 CPU-seconds). One torch thread: these ops are too small for two, and
    two threads on a busy CPU spin far longer than they compute."""
    from ijepa.data import shard_dataset
    from ijepa.trainer import prepare, run_pretraining

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("predviz")
    shards = root / "shards"
    shard_dataset({"source": "scenes", "image_size": 16, "seed": 0, "maxcount": 256,
                   "scenes": {"sizes": {"train": 256, "val": 48}}}, shards, progress=False)
    cfg = tiny_config(optimisation={"batch_size": 16, "total_steps": 150, "warmup_steps": 15, "lr": 3e-3},
                      checkpoint_every=150, masks={**TINY_MASKS, "min_keep": 4})
    run_pretraining(cfg, shards, root / "run")
    _, state = ckpt.load_latest(root / "run" / ckpt.CHECKPOINT_SUBDIR)
    assert state["step"] == 150
    yield prepare(cfg, shards, verify=False), state, root / "run"
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def report(pretrained):
    plan, state, _ = pretrained
    return report_for_checkpoint(plan, state, SMALL)


def test_patchify_and_unpatchify_are_inverse():
    x = torch.rand(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    assert torch.equal(unpatchify(p, 4, 3, (2, 3)), x)
    assert torch.equal(p[0, 4], x[0, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1))  # row 1, column 1


def test_decoded_predictions_of_held_out_target_blocks_beat_the_mean_patch(report, tmp_path):
    m, mse = report.metrics, report.metrics["mse"]
    assert m["split"] == "val" and m["eval_images"] == 48 and m["checkpoint_step"] == 150
    assert m["target_patches"] > 0 and m["train_patches"] == 128 * 16
    # the decoder reads pixels from target features of unseen images, far better than one mean patch
    assert mse["target_features_all_patches"] < 0.5 * mse["mean_patch"], mse
    assert mse["target_features"] < 0.5 * mse["mean_patch"], mse
    # the predictions of masked blocks (from the context only) decode closer to the truth than the
    # mean patch and than the image's mean context colour
    assert mse["predictions"] < mse["mean_patch"] and mse["predictions"] < mse["context_mean"], mse
    assert set(mse) == {"target_features", "predictions", "mean_patch", "position_mean", "context_mean",
                        "target_features_all_patches"}
    # ... and are worse than decoding the true target features (the predictor does not see the block)
    assert mse["predictions"] > mse["target_features"], mse

    save_report(report, tmp_path / "predictions.png", tmp_path / "predictor_viz.json")
    assert json.loads((tmp_path / "predictor_viz.json").read_text())["mse"] == pytest.approx(mse)
    assert (tmp_path / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_decoder_reads_the_features_not_the_position_or_the_average(pretrained):
    """Shuffling held-out features across patches destroys the reconstruction: the decoder uses
    what each token holds about its own patch."""
    plan, state, _ = pretrained
    method = load_ijepa(plan.cfg, plan.model, plan.masker, state)
    patch, chans = plan.model.encoder.patch_size, plan.model.encoder.in_chans
    train, held = first_images(plan.shards.root, "train", 128), first_images(plan.shards.root, "val", 48)
    feats, pix = token_pool(method.target_encoder, train, patch, 64, method.device)
    decoder, _ = fit_decoder(feats, pix, patch, chans, SMALL.decoder)
    vf, vp = token_pool(method.target_encoder, held, patch, 64, method.device)
    shuffled = vf[torch.randperm(vf.shape[0], generator=torch.Generator().manual_seed(0))]
    assert decode_mse(decoder, vf, vp) < 0.3 * decode_mse(decoder, shuffled, vp)


def test_the_figure_shows_context_targets_and_both_decodings(pretrained, report):
    plan, _, _ = pretrained
    axes = report.figure.axes
    assert len(axes) == 3 * len(COLUMNS)
    assert [ax.get_title() for ax in axes[:len(COLUMNS)]] == list(COLUMNS)
    # row 0: the image, then the context panel greys out every target patch (outlined squares)
    image = np.asarray(axes[0].images[0].get_array())
    context = np.asarray(axes[1].images[0].get_array())
    target = np.asarray(axes[2].images[0].get_array())
    squares = [(int(p.get_y()), int(p.get_x())) for p in axes[1].patches]
    assert squares and [(int(p.get_y()), int(p.get_x())) for p in axes[4].patches] == squares
    p = plan.model.encoder.patch_size
    for r, c in squares:
        block = (slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p))
        assert np.allclose(context[block], 0.5)                   # hidden from the context encoder
        assert np.allclose(target[block], image[block], atol=1e-6)  # shown in the target panel
    outside = np.ones(image.shape[:2], bool)
    for r, c in squares:
        outside[r * p:(r + 1) * p, c * p:(c + 1) * p] = False
    assert np.allclose(target[outside], 0.5)


def test_parameters_are_validated_before_any_work():
    params = read_parameters([ROOT / "conf" / "base"])
    for dataset in ("scenes", "fashion_mnist", "imagefolder"):
        cfg = visualise_config(visualise_mapping(params, dataset))
        assert cfg.enabled and cfg.split == "val"
        assert "visualise" not in pretrain_mapping(params, dataset)  # not a training setting
    with pytest.raises(ConfigError, match=r"images \(8\) must be <= eval_images \(4\)"):
        visualise_config({"images": 8, "eval_images": 4})
    with pytest.raises(ConfigError, match=r"pretrain\.visualise\.decoder.*steps must be an integer >= 1, got 0"):
        visualise_config({"decoder": {"steps": 0}})
    with pytest.raises(ConfigError, match=r"pretrain\.visualise\.split: 'train' is not one of"):
        visualise_config({"split": "train"})
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['step'\]"):
        visualise_config({"step": 10})


def test_skipped_for_mae_disabled_or_without_the_split(tmp_path, caplog):
    splits = {"train": {}, "val": {}}
    assert skip_reason(VisualiseConfig(), "ijepa", splits) is None
    assert "no predictor" in skip_reason(VisualiseConfig(), "mae", splits)
    assert "enabled is false" in skip_reason(VisualiseConfig(enabled=False), "ijepa", splits)
    assert "no 'test' split" in skip_reason(VisualiseConfig(split="test"), "ijepa", splits)

    # the pipeline node: a placeholder figure and a metrics file saying why, and a log line
    from conftest import make_shards
    from ijepa.trainer import prepare
    from pipelines.pretrain.nodes import visualise_predictions

    plan = prepare(tiny_config(method="mae"), make_shards(tmp_path / "s", n=16), verify=False)
    with caplog.at_level("INFO", logger="ijepa.predictions"):
        fig, metrics = visualise_predictions(plan, VisualiseConfig(), tmp_path, {"steps": 1})
    assert "method 'mae' has no predictor" in metrics["skipped"] and fig.axes
    assert "predictor visualisation skipped: method 'mae'" in caplog.text


def test_pretraining_is_what_makes_the_predictions_decodable(pretrained, report):
    """The same decoder settings on a random-init I-JEPA (the trainer's initial weights): its
    target features still decode (a random ViT's tokens keep much of their patch), but its
    predictor's outputs decode far worse than the pretrained predictor's."""
    from ijepa.methods.ijepa import IJepa
    from ijepa.predictions import predictions_report

    plan, _, _ = pretrained
    torch.manual_seed(plan.cfg.seed)
    random_init = IJepa(plan.cfg, plan.model, plan.masker, torch.device("cpu"))
    rand = predictions_report(random_init, plan.shards.root, SMALL).metrics["mse"]
    trained = report.metrics["mse"]
    assert trained["predictions"] < 0.5 * rand["predictions"], (trained, rand)


@pytest.mark.parametrize("masks", [{"context_policy": "pad"}, {"nenc": 2}], ids=["pad", "nenc2"])
def test_padded_context_lists_and_several_context_blocks(pretrained, masks):
    """context_policy "pad" (padding masked out of attention, of the context panel and of the
    context-mean baseline) and nenc 2 (predictions ordered by target block, context block, image):
    the pixels are gathered in the predictions' order, so decoded targets still match them."""
    from ijepa.trainer import prepare

    plan, state, _ = pretrained
    other = prepare(tiny_config(masks={**TINY_MASKS, "min_keep": 4, **masks}), plan.shards, verify=False)
    report = report_for_checkpoint(other, state, SMALL)
    mse = report.metrics["mse"]
    assert all(np.isfinite(v) for v in mse.values())
    assert mse["target_features"] < 0.5 * mse["mean_patch"] and mse["predictions"] < mse["mean_patch"], mse
    context = np.asarray(report.figure.axes[1].images[0].get_array())
    image = np.asarray(report.figure.axes[0].images[0].get_array())
    assert 0 < np.mean(np.all(np.isclose(context, image), axis=-1)) < 1  # some patches shown, some hidden


def test_the_node_reads_the_final_checkpoint(pretrained):
    from pipelines.pretrain.nodes import visualise_predictions

    plan, _, run = pretrained
    fig, metrics = visualise_predictions(plan, SMALL, run, {"steps": 150})
    assert metrics["checkpoint_step"] == 150 and metrics["mse"]["predictions"] > 0 and len(fig.axes) == 15
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint of the final step 200"):
        visualise_predictions(plan, SMALL, run, {"steps": 200})
