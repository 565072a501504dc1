"""Per-iteration schedules: values at start, end of warm-up and end; step objects; state."""
from __future__ import annotations

import math

import pytest

from ijepa.schedules import Cosine, Linear, WarmupCosine
from ijepa.train_config import load_config
from ijepa.trainer.optim import build_schedules


def test_warmup_cosine_values():
    s = WarmupCosine(start=2e-4, peak=1e-3, final=1e-6, warmup=10, total=110)
    assert s.value(0) == pytest.approx(2e-4)
    assert s.value(5) == pytest.approx(6e-4)  # linear warm-up
    assert s.value(10) == pytest.approx(1e-3)  # end of warm-up = peak
    assert s.value(60) == pytest.approx((1e-3 + 1e-6) / 2)  # half way through the cosine
    assert s.value(110) == pytest.approx(1e-6)
    assert s.value(500) == pytest.approx(1e-6)  # stays at final
    vals = [s.value(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone decay after warm-up


def test_weight_decay_cosine_rises_and_momentum_linear():
    wd = Cosine(0.04, 0.4, total=100)
    assert wd.value(0) == pytest.approx(0.04)
    assert wd.value(50) == pytest.approx(0.22)
    assert wd.value(100) == pytest.approx(0.4)
    vals = [wd.value(t) for t in range(101)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    m = Linear(0.996, 1.0, total=100)
    assert m.value(0) == pytest.approx(0.996)
    assert m.value(25) == pytest.approx(0.997)
    assert m.value(100) == pytest.approx(1.0)


def test_step_objects_count_and_restore():
    a = WarmupCosine(0.0, 1.0, 0.0, warmup=3, total=10)
    got = [a.step() for _ in range(5)]
    assert got == [a.value(t) for t in range(5)]
    b = WarmupCosine(0.0, 1.0, 0.0, warmup=3, total=10)
    b.load_state_dict(a.state_dict())
    assert [b.step() for _ in range(5)] == [a.step() for _ in range(5)]
    with pytest.raises(ValueError):
        WarmupCosine(0, 1, 0, warmup=11, total=10)


def test_build_schedules_from_config_epochs_and_steps():
    cfg = load_config({"optimisation": {"warmup_epochs": 2.0, "lr": 1e-3, "start_lr": 1e-4, "final_lr": 0.0}})
    s = build_schedules(cfg, total_steps=100, steps_per_epoch=10)
    assert s.lr.warmup == 20
    assert s.at(0) == pytest.approx({"lr": 1e-4, "weight_decay": 0.04, "momentum": 0.996})
    assert s.at(20)["lr"] == pytest.approx(1e-3)
    assert s.at(100) == pytest.approx({"lr": 0.0, "weight_decay": 0.4, "momentum": 1.0})
    cfg2 = load_config({"optimisation": {"warmup_steps": 7}})
    assert build_schedules(cfg2, 50, 10).lr.warmup == 7
    assert math.isclose(build_schedules(cfg2, 5, 10).lr.value(5), cfg2.optimisation.final_lr)  # warm-up clipped
