"""GPU-ready training, checked on CPU with tiny models: gradient accumulation, activation
checkpointing, no host reads between log steps, NaN stop before a checkpoint, the background
checkpoint writer, compile (recompiles counted; compiled step = eager step)."""
from __future__ import annotations

import sys
import threading

import pytest
import torch

from ijepa import checkpoint as ckpt
from ijepa.config import ConfigError
from ijepa.monitor import LossHistory
from ijepa.train_config import load_config
from ijepa.trainer import NonFiniteLossError, Trainer, prepare, run_pretraining
from ijepa.trainer.ckpt_writer import CheckpointWriter
from ijepa.trainer.compiling import compile_counters, resolve_compile
from conftest import make_shards, tiny_config

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), n=64, size=16, channels=1)


def _weights(path):
    return ckpt.load_checkpoint(path)


def _close(a: dict, b: dict, tol: float) -> None:
    for part in ("encoder", "predictor", "target_encoder"):
        for k, v in a[part].items():
            rel = float((v - b[part][k]).norm() / v.norm().clamp_min(1e-12))
            assert rel <= tol, f"{part}.{k}: relative difference {rel}"


def test_config_accum_and_compile_fields():
    with pytest.raises(ConfigError, match=r"batch_size 12 is not divisible by nproc 2 x optimisation\.accum_steps 4"):
        load_config(tiny_config(optimisation={"batch_size": 12, "accum_steps": 4}, nproc=2))
    with pytest.raises(ConfigError, match=r"accum_steps must be >= 1"):
        load_config(tiny_config(optimisation={"accum_steps": 0}))
    with pytest.raises(ConfigError, match=r"pretrain\.distributed"):
        load_config(tiny_config(distributed="zero3"))
    assert load_config({}).compile == "auto" and load_config({"compile": True}).compile is True
    assert resolve_compile("auto", torch.device("cuda", 0)) and not resolve_compile("auto", torch.device("cpu"))
    assert resolve_compile(True, torch.device("cpu")) and not resolve_compile(False, torch.device("cuda", 0))


def test_accum_two_passes_of_b_track_one_pass_of_2b(shards, tmp_path):
    # the same global batch (8) in 2 passes of 4 or 1 pass of 8: same images, crops and masks
    cfg = tiny_config(optimisation={"total_steps": 12, "batch_size": 8}, log_every=1, checkpoint_every=6)
    one = run_pretraining(cfg, shards, tmp_path / "one")
    two = run_pretraining(tiny_config(**{**cfg, "optimisation": {**cfg["optimisation"], "accum_steps": 2}}),
                          shards, tmp_path / "two")
    assert two["accum_steps"] == 2 and two["micro_batch"] == 4 and one["micro_batch"] == 8
    assert two["steps"] == one["steps"] == 12  # schedules and checkpoints count optimiser steps
    la, lb = LossHistory.read_csv(tmp_path / "one" / "loss.csv"), LossHistory.read_csv(tmp_path / "two" / "loss.csv")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, 13))
    for x, y in zip(la, lb):
        assert abs(x["loss"] - y["loss"]) <= REL_TOL * abs(x["loss"]), (x["step"], x["loss"], y["loss"])
        assert x["lr"] == y["lr"] and x["weight_decay"] == y["weight_decay"]
    _close(_weights(tmp_path / "one" / "checkpoints" / "ckpt-00000012.pt"),
           _weights(tmp_path / "two" / "checkpoints" / "ckpt-00000012.pt"), REL_TOL)


def test_accum_resume_is_bitwise_equal(shards, tmp_path):
    cfg = tiny_config(optimisation={"total_steps": 10, "batch_size": 8, "accum_steps": 2}, log_every=3,
                      checkpoint_every=4, keep_last=5)
    ref = run_pretraining(cfg, shards, tmp_path / "ref")
    run_pretraining(cfg, shards, tmp_path / "run")
    for step in (8, 10):  # back to the step-4 checkpoint, as after a kill
        (tmp_path / "run" / "checkpoints" / f"ckpt-{step:08d}.pt").unlink(missing_ok=True)
    again = run_pretraining(cfg, shards, tmp_path / "run")
    assert again["resumed_from_step"] == 4 and ref["steps"] == again["steps"] == 10
    a = _weights(tmp_path / "ref" / "checkpoints" / "ckpt-00000010.pt")
    b = _weights(tmp_path / "run" / "checkpoints" / "ckpt-00000010.pt")
    for part in ("encoder", "predictor", "target_encoder"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs after an accumulated resume"
    ra, rb = LossHistory.read_csv(tmp_path / "ref" / "loss.csv"), LossHistory.read_csv(tmp_path / "run" / "loss.csv")
    assert [int(r["step"]) for r in rb] == [3, 6, 9, 10]
    for x, y in zip(ra, rb):  # every logged value but the timing
        assert {k: v for k, v in x.items() if k != "img_per_s"} == {k: v for k, v in y.items() if k != "img_per_s"}


def test_grad_checkpointing_gives_the_plain_gradients(shards, tmp_path):
    cfg = tiny_config(optimisation={"total_steps": 3, "batch_size": 8}, log_every=1)
    plain = Trainer(prepare(cfg, shards), tmp_path / "a")
    plain.build()
    ckpted = Trainer(prepare({**cfg, "model": {**cfg["model"], "grad_checkpointing": True}}, shards), tmp_path / "b")
    ckpted.build()
    assert ckpted.method.encoder.grad_checkpointing and ckpted.method.predictor.grad_checkpointing
    assert not plain.method.encoder.grad_checkpointing
    calls = {"n": 0}
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    import ijepa.models

    ijepa.models.checkpoint = counting
    try:
        for step in range(3):
            a, b = plain.train_step(step), ckpted.train_step(step)
            assert torch.allclose(a["loss"], b["loss"], rtol=1e-6, atol=0)
    finally:
        ijepa.models.checkpoint = real
    blocks = ckpted.plan.model.encoder.depth + ckpted.plan.model.predictor.depth
    assert calls["n"] == 3 * blocks  # every trained block checkpointed (the no-grad target pass is not)
    for (name, p), q in zip(plain.method.trained.named_parameters(), ckpted.method.trained.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name


def test_nothing_read_from_tensors_between_log_steps(shards, tmp_path, monkeypatch):
    """The trainer and the methods convert no tensor to a host value (item, float, int, bool,
    tolist) except at log steps and checkpoints: on a GPU, each would wait for the device."""
    cfg = tiny_config(optimisation={"total_steps": 10, "batch_size": 8}, log_every=5, checkpoint_every=5)
    tr = Trainer(prepare(cfg, shards), tmp_path / "run")
    tr.build()
    watched = ("/ijepa/trainer/", "/ijepa/methods/", "/ijepa/models.py")
    reads: list[tuple[int, str]] = []

    def spy(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if any(w in caller for w in watched):
                reads.append((tr.step, f"{name} in {caller.rsplit('/', 1)[-1]}"))
            return real(self, *args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    tr.train_loop()
    assert tr.step == 10 and reads, "the log steps read the losses"
    assert {step for step, _ in reads} <= {5, 10}, reads
    assert [int(r["step"]) for r in tr.history.rows] == [5, 10]


def test_nan_is_caught_before_the_next_checkpoint(shards, tmp_path, nan_loss_at):
    nan_loss_at(7)
    # losses read at 5 (log) and 6 (checkpoint), then at 9 (checkpoint): the NaN of step 7 stops
    # the run there, before the step-9 checkpoint
    cfg = tiny_config(optimisation={"total_steps": 12}, log_every=5, checkpoint_every=3)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 7 of 12.*stopped at step 9.*ckpt-00000006\.pt"):
        run_pretraining(cfg, shards, tmp_path / "run")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == [3, 6]
    state = ckpt.load_latest(tmp_path / "run" / "checkpoints")[1]
    assert all(torch.isfinite(v).all() for v in state["encoder"].values())


def test_checkpoint_writer_one_write_at_a_time_errors_surface(tmp_path, monkeypatch):
    gate, started = threading.Event(), threading.Event()
    active, seen = {"now": 0, "max": 0}, []
    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        active["now"] += 1
        active["max"] = max(active["max"], active["now"])
        started.set()
        if obj.get("step") == 1:
            assert gate.wait(timeout=60)  # held until the test lets it go
        if obj.get("step") == 3:
            active["now"] -= 1
            raise OSError(28, "No space left on device")
        seen.append(obj["step"])
        real_save(obj, f, *args, **kwargs)
        active["now"] -= 1

    monkeypatch.setattr(ckpt.torch, "save", slow_save)
    w = CheckpointWriter(tmp_path / "ck", keep_last=5)
    w.submit({"step": 1, "w": torch.ones(2)}, 1)
    assert started.wait(timeout=60) and w.busy  # the caller goes on while the write runs
    second = threading.Thread(target=w.submit, args=({"step": 2, "w": torch.ones(2)}, 2))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive() and seen == []  # the second waits for the first
    gate.set()
    second.join(timeout=60)
    assert w.wait() == tmp_path / "ck" / "ckpt-00000002.pt" and seen == [1, 2] and active["max"] == 1
    w.submit({"step": 3, "w": torch.ones(2)}, 3)  # fails in the background ...
    with pytest.raises(ckpt.CheckpointWriteError, match=r"ckpt-00000003\.pt.*No space left.*ckpt-00000002\.pt"):
        w.wait()  # ... and is raised on the caller's thread
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "ck")] == [1, 2]


def test_compile_does_not_recompile_as_mask_lengths_change(shards, tmp_path):
    torch._dynamo.reset()
    cfg = tiny_config(compile=True, optimisation={"total_steps": 8}, log_every=100, checkpoint_every=100)
    tr = Trainer(prepare(cfg, shards), tmp_path / "run")
    tr.compile_backend = "aot_eager"  # dynamo's graphs and guards as with inductor, without C++ builds
    tr.build()
    lengths, graphs = set(), []
    for step in range(8):
        out = tr.train_step(step)
        m = tr.masks_for(step)
        lengths.add((m.context.shape[-1], m.targets.shape[-1]))
        graphs.append(compile_counters()["unique_graphs"])
    assert len(lengths) >= 2, lengths  # context and target lengths varied from step to step
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs  # ... without a single new graph
    assert compile_counters()["recompiles"] == 0
    assert torch.isfinite(out["loss"])


def test_compiled_step_equals_eager_step(shards, tmp_path):
    """The compiled train step (dynamo + AOTAutograd: the graphs inductor would get; inductor's own
    C++ build of even this tiny model takes many minutes on a shared 2-core CPU, so it is
    opt-in: IJEPA_TEST_COMPILE_BACKEND=inductor) gives the eager step's losses and weights."""
    import os

    torch._dynamo.reset()
    cfg = tiny_config(optimisation={"total_steps": 4}, log_every=100, checkpoint_every=100)
    eager = Trainer(prepare(cfg, shards), tmp_path / "eager")
    eager.build()
    comp = Trainer(prepare({**cfg, "compile": True}, shards), tmp_path / "compiled")
    comp.compile_backend = os.environ.get("IJEPA_TEST_COMPILE_BACKEND", "aot_eager")
    comp.build()
    assert comp.compiled and not eager.compiled and hasattr(comp.train_module, "_orig_mod")
    for step in range(4):
        a, b = eager.train_step(step), comp.train_step(step)
        assert torch.allclose(a["loss"], b["loss"], rtol=1e-5, atol=0), (step, a["loss"], b["loss"])
    for (name, p), q in zip(eager.method.trained.named_parameters(), comp.method.trained.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name
    assert compile_counters()["unique_graphs"] >= 1
