"""Probe-stage fits side by side (ijepa.probe_fits) vs one after the other on all threads.

The fits of the default Fashion-MNIST probe stage at its sizes, on synthetic class-structured
features: per model (3, as I-JEPA / random init / pixels) a linear head over the weight-decay
grid on [n_train, dim] pooled features and an attentive probe on [n_train, tokens, token_dim]
bf16 tokens. Both schedules run the same fits through `run_fits` (workers 1 and 2),
interleaved so that background load hits both alike.

    python benchmarks/bench_probe_fits.py        # prints JSON
"""
from __future__ import annotations

import json
import statistics
import time

import torch

from ijepa.attentive import AttentiveConfig
from ijepa.fit_progress import FitProgress
from ijepa.probe_fits import Fit, attentive_fn, fit_fn, run_fits
from ijepa.probes import ProbeConfig

# class centres N(0, 1), noise of this std: overlapping classes (linear test top-1 about 0.6 at 512 dims), so the
# L-BFGS heads run their iterations as on real features instead of stopping on a separable set
NOISE = 12.0

QUICK = dict(n_train=600, n_val=200, n_test=200, dim=32, tokens=16, token_dim=16, epochs=2, repeats=1)


def _data(n: int, dim: int, classes: int, gen: torch.Generator, centres: torch.Tensor) -> tuple:
    y = torch.randint(0, classes, (n,), generator=gen)
    return centres[y] + torch.randn(n, dim, generator=gen) * NOISE, y


def _fits(cfg: ProbeConfig, models: int, n: dict[str, int], dim: int, tokens: int, token_dim: int,
          classes: int = 10) -> list[Fit]:
    gen = torch.Generator().manual_seed(0)
    order = ("train", "val", "test")
    centres, tcentres = torch.randn(classes, dim, generator=gen), torch.randn(classes, tokens * token_dim, generator=gen)
    fits = []
    for m in range(models):
        feats, toks, ys = {}, {}, {}
        for s in order:
            feats[s], ys[s] = _data(n[s], dim, classes, gen, centres)
            toks[s] = (tcentres[ys[s]] + torch.randn(n[s], tokens * token_dim, generator=gen) * 2.0
                       ).view(n[s], tokens, token_dim).to(torch.bfloat16)
        name = f"m{m}"
        fits.append(Fit(("linear",), name, float(n["train"] * dim),
                        fit_fn(cfg, "linear", name, (ys, classes), feats, order, [], [])))
        fits.append(Fit(("attentive_cls",), name, float(n["train"] * dim) / 2,
                        attentive_fn(cfg, name, toks, order, {"attentive_cls": (ys["train"], ys["val"], classes)},
                                     {"attentive_cls": ys["test"]}, None)))
    return fits


def _timed(fits: list[Fit], workers: int) -> float:
    progress = FitProgress({(f.probes[0], f.model): f.work for f in fits}, bar=False)
    t0 = time.perf_counter()
    run_fits(fits, workers, progress)
    return time.perf_counter() - t0


def run(n_train: int = 15000, n_val: int = 2000, n_test: int = 10000, dim: int = 512, tokens: int = 49,
        token_dim: int = 128, epochs: int = 10, models: int = 3, repeats: int = 2) -> dict:
    """Median seconds of the same fits in turn (workers 1) and side by side (workers = torch's threads)."""
    workers = max(2, torch.get_num_threads())
    cfg = ProbeConfig(attentive=AttentiveConfig(epochs=epochs, warmup_epochs=1))
    fits = _fits(cfg, models, {"train": n_train, "val": n_val, "test": n_test}, dim, tokens, token_dim)
    in_turn, side = [], []
    for _ in range(repeats):
        in_turn.append(_timed(fits, 1))
        side.append(_timed(fits, workers))
    a, b = statistics.median(in_turn), statistics.median(side)
    return {"config": {"n_train": n_train, "dim": dim, "tokens": tokens, "token_dim": token_dim, "epochs": epochs,
                       "models": models, "workers": workers, "threads": torch.get_num_threads()},
            "in_turn_s": round(a, 3), "side_by_side_s": round(b, 3), "ratio": round(a / b, 3)}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
