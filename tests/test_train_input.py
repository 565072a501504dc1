"""The step input built in DataLoader workers (ijepa.train_input): the same (images, masks) for
0, 1 and 2 workers in memory modes, masks and crops that depend only on (seed, step), a start
in the middle that continues the same sequence, and equal training with and without workers."""
from __future__ import annotations

import pytest
import torch

from conftest import load_benchmark, make_shards, tiny_config
from ijepa.data import shard_dataset
from ijepa.train_config import load_config
from ijepa.train_input import TrainInput
from ijepa.trainer import Trainer, prepare, run_pretraining


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("grey"), n=48, size=16, channels=1, per_shard=16)


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    root = load_benchmark("photo_folder").write_photo_folder(tmp_path_factory.mktemp("ph"), n=20, classes=2,
                                                             min_side=20, max_side=60)
    out = tmp_path_factory.mktemp("phs") / "shards"
    shard_dataset({"source": "imagefolder", "image_size": 16, "maxcount": 6, "workers": 1,
                   "imagefolder": {"root": str(root), "val_fraction": 0.0, "test_fraction": 0.0}}, out,
                  progress=False)
    return out


def _input(shards, workers: int, **over) -> TrainInput:
    cfg = load_config(tiny_config(num_workers=workers, optimisation={"batch_size": 8, "total_steps": 9}, **over))
    plan = prepare(cfg, shards)
    return TrainInput(cfg, plan.shards, plan.masker, 8, 0, 1, torch.device("cpu"))


def _run(inp: TrainInput, start: int, total: int) -> list:
    return [(x.clone(), m) for x, m in inp.batches(start, total)]


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ma), (xb, mb) in zip(a, b):
        assert torch.equal(xa, xb)
        assert torch.equal(ma.context, mb.context) and torch.equal(ma.targets, mb.targets)


@pytest.mark.parametrize("kind", ["decoded", "photo"])
def test_memory_modes_give_the_same_steps_for_0_1_2_workers_and_from_any_start(kind, grey, photo_shards):
    shards = grey if kind == "decoded" else photo_shards
    ref = _run(_input(shards, 0), 0, 9)  # 9 steps over 2 epochs of 6 / 2 batches
    inp = _input(shards, 0)
    assert inp.mode == "memory" and inp.steps_per_epoch == (6 if kind == "decoded" else 2)
    x0 = ref[0][0]
    assert x0.shape == (8, 1 if kind == "decoded" else 3, 16, 16)
    assert x0.dtype == (torch.float32 if kind == "decoded" else torch.uint8)  # photos: uint8 until the device
    for workers in (1, 2):
        _same(_run(_input(shards, workers), 0, 9), ref)
    _same(_run(_input(shards, 2), 5, 9), ref[5:])  # a resumed run continues the same sequence
    assert not torch.equal(ref[0][0], ref[1][0]) and not torch.equal(ref[0][1].targets, ref[1][1].targets)


def test_stream_mode_masks_and_crops_follow_the_step_not_the_worker(photo_shards):
    kw = {"data": {"mode": "stream", "shuffle_buffer": 4}}
    ref = _run(_input(photo_shards, 0, **kw), 0, 5)
    _same(_run(_input(photo_shards, 1, **kw), 0, 5), ref)  # 0 and 1 workers: one sample stream
    two = _run(_input(photo_shards, 2, **kw), 0, 5)
    for (_, ma), (_, mb) in zip(two, ref):  # masks never depend on the worker
        assert torch.equal(ma.context, mb.context) and torch.equal(ma.targets, mb.targets)
    _same(_run(_input(photo_shards, 2, **kw), 3, 5), two[3:])  # resume inside and across an epoch


def test_training_with_and_without_workers_ends_equal(grey, tmp_path):
    ends = []
    for workers in (0, 2):
        cfg = tiny_config(optimisation={"total_steps": 4, "batch_size": 8, "warmup_steps": 1}, checkpoint_every=10,
                          num_workers=workers)
        run_pretraining(cfg, grey, tmp_path / f"w{workers}")
        ends.append(torch.load(tmp_path / f"w{workers}" / "checkpoints" / "ckpt-00000004.pt", weights_only=True))
    for k, v in ends[0]["encoder"].items():
        assert torch.equal(v, ends[1]["encoder"][k]), k


def test_trainer_receives_float_images_and_masks_on_its_device(photo_shards, tmp_path):
    cfg = load_config(tiny_config(num_workers=1, optimisation={"batch_size": 8, "total_steps": 2}))
    tr = Trainer(prepare(cfg, photo_shards), tmp_path / "run")
    tr.build()
    assert tr.data_mode == "memory" and tr.input.num_workers == 1
    x, m = tr.next_batch(0)
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and x.shape[-1] == 16
    ref = tr.masks_for(0)
    assert torch.equal(m.context, ref.context) and torch.equal(m.targets, ref.targets)
