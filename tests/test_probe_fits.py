"""The probe stage's fits side by side (ijepa.probe_fits): every fit's result comes back once,
fits really overlap, one torch thread each and the caller's threads restored, a failing fit
stops the rest with its own error, and run_probes gives the same numbers however the fits are
scheduled."""
from __future__ import annotations

import threading

import pytest
import torch

from ijepa.fit_progress import FitProgress
from ijepa.probe_fits import Fit, Outcome, run_fits
from ijepa.probes import run_probes
from test_probes import FAST, _encoder, _scenes_shards


def _fit(name: str, model: str, work: float, body=lambda: None) -> Fit:
    def run():
        body()
        return {name: Outcome({model: work}, {"threads": torch.get_num_threads()})}
    return Fit((name,), model, work, run)


def _progress(fits) -> FitProgress:
    return FitProgress({(p, f.model): f.work for f in fits for p in f.probes}, bar=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_every_fit_comes_back_once_with_its_seconds(workers):
    fits = [_fit(f"p{i}", m, float(i + 1)) for i in range(3) for m in ("a", "b")]
    progress = _progress(fits)
    out = run_fits(fits, workers, progress)
    assert set(out) == {(f"p{i}", m) for i in range(3) for m in ("a", "b")}
    assert all(o.values == {m: float(int(p[1:]) + 1)} for (p, m), o in out.items())
    assert all(o.detail["seconds"] >= 0 for o in out.values())
    assert progress.count == len(fits)


def test_fits_overlap_on_one_torch_thread_each_and_threads_are_restored():
    """Two fits wait for each other at a barrier: only fits that run side by side get past it."""
    threads = torch.get_num_threads()
    barrier = threading.Barrier(2, timeout=60)
    fits = [_fit("p", m, 1.0, barrier.wait) for m in ("a", "b")]
    out = run_fits(fits, 2, _progress(fits))
    assert [o.detail["threads"] for o in out.values()] == [1, 1]
    assert torch.get_num_threads() == threads


def test_a_failing_fit_raises_its_error_and_cancels_the_fits_not_started():
    threads = torch.get_num_threads()
    started: list[str] = []

    def boom():
        raise ValueError("attentive probe cls: 3 train / 0 val tokens")

    fits = [_fit("bad", "a", 10.0, boom)] + [_fit(f"p{i}", "b", 1.0, lambda i=i: started.append(i)) for i in range(50)]
    with pytest.raises(ValueError, match="0 val tokens"):
        run_fits(fits, 2, _progress(fits))
    assert len(started) < 50 and torch.get_num_threads() == threads


def test_run_probes_numbers_do_not_depend_on_the_order_fits_finish(tmp_path):
    """Side by side, each fit on one thread: two runs (the fits finishing in whatever order)
    give the same metrics, attentive probes included (their initialisation takes turns on
    torch's global generator)."""
    shards = _scenes_shards(tmp_path)
    enc = _encoder(tmp_path / "enc")
    cfg = dict(FAST, fit_workers=2)
    first, _ = run_probes(cfg, enc, shards, tmp_path / "cache", progress=False)
    second, extras = run_probes(cfg, enc, shards, tmp_path / "cache", progress=False)
    assert first == second
    assert {"attentive_count", "knn_depth", "count", "lowshot"} <= set(first["probes"])
    assert all(d["seconds"] >= 0 for row in extras["details"].values() for d in row.values())
    assert extras["seconds"]["fits"] > 0


def test_fit_workers_is_validated_before_any_work(tmp_path):
    from ijepa.config import ConfigError

    with pytest.raises(ConfigError, match="fit_workers must be >= 1 or null, got 0"):
        run_probes(dict(FAST, fit_workers=0), tmp_path / "no-encoder", tmp_path / "no-shards", tmp_path / "c")
