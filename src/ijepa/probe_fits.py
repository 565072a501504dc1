"""The probe stage's fits, run side by side: every (probe, model) fit is an independent task.

Once the features are extracted, a fit reads only its model's cached features or tokens and its
labels, so the fits of the three models and of the probe families can run in any order and at
the same time. On a CPU a fit is a chain of small products (L-BFGS passes over 15,000 x 512
features, the attentive probe's mini-batches) that a second torch thread speeds up little:
on the default Fashion-MNIST features (2-core AMD EPYC, bf16) the linear heads of two models
took 11.9 s one after the other on 2 threads and 7.5 s side by side on 1 thread each, the
attentive probes 8.0 and 6.3 s. So `run_fits` runs `workers` fits at a time, each on one torch
thread (inter-op parallelism: torch releases the GIL inside its ops), the largest first.

Each fit is deterministic on one thread, so the results do not depend on which fit finishes
first; they can differ in the last digits between `workers` 1 (every fit on all threads) and
more (a product summed over one thread adds in another order than over two).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

import torch

from ijepa.attentive import fit_attentive_probes
from ijepa.fit_progress import FitProgress
from ijepa.knn import knn_top1
from ijepa.linear import LinearProbe, fit_linear_probe

if TYPE_CHECKING:
    from ijepa.probes import ProbeConfig

__all__ = ["Fit", "Outcome", "attentive_fn", "default_workers", "fit_fn", "fit_head", "run_fits", "side_by_side"]

T = TypeVar("T")


@dataclass
class Outcome:
    """What one fit gives one probe row: its entries (`{"ijepa": top1}`, low-shot also
    `{"ijepa_std": std}`), its details for probe_details.json, and the test predictions where
    the caller wants them (the confusion matrix)."""

    values: dict[str, float]
    detail: dict[str, Any] = field(default_factory=dict)
    pred: torch.Tensor | None = None


@dataclass
class Fit:
    """One independent fit: the probe rows it fills for one model (an attentive fit fills every
    label's row, its probes trained in the same passes), its relative cost (ETA weights and
    the order, largest first) and the function that runs it."""

    probes: tuple[str, ...]
    model: str
    work: float
    run: Callable[[], dict[str, Outcome]]


def default_workers() -> int:
    """Fits side by side when `workers` is null: the threads torch would give one fit."""
    return max(1, torch.get_num_threads())


def side_by_side(calls: Sequence[Callable[[], T]], workers: int) -> Iterator[tuple[int, T]]:
    """Yield (index, result) of every call as it finishes, `workers` at a time on one torch thread
    each (1: in order, on all threads). The first call to fail cancels those not started and
    raises its error; the caller's torch threads are restored either way."""
    if workers <= 1 or len(calls) <= 1:
        for i, call in enumerate(calls):
            yield i, call()
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probe-fit") as pool:
            futures = {pool.submit(call): i for i, call in enumerate(calls)}
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        torch.set_num_threads(threads)


def run_fits(fits: Sequence[Fit], workers: int, progress: FitProgress) -> dict[tuple[str, str], Outcome]:
    """Run every fit, largest first, `workers` at a time (`side_by_side`); returns
    {(probe, model): Outcome} with each outcome's detail given the fit's `seconds` (split evenly
    between the rows of a joint fit)."""
    order = sorted(fits, key=lambda f: -f.work)
    results: dict[tuple[str, str], Outcome] = {}

    def timed(fit: Fit) -> Callable[[], tuple[dict[str, Outcome], float]]:
        def call() -> tuple[dict[str, Outcome], float]:
            t0 = time.perf_counter()
            return fit.run(), time.perf_counter() - t0
        return call

    for i, (out, seconds) in side_by_side([timed(fit) for fit in order], workers):
        fit = order[i]
        for probe in fit.probes:
            outcome = out[probe]
            outcome.detail["seconds"] = round(seconds / len(fit.probes), 3)
            results[(probe, fit.model)] = outcome
            progress.done(probe, fit.model, seconds / len(fit.probes))
    return results


def fit_head(cfg: "ProbeConfig", tx: torch.Tensor, ty: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor,
             n_classes: int) -> LinearProbe:
    """The probe stage's linear head (weight decay chosen on val) with `cfg`'s solver settings."""
    return fit_linear_probe(tx, ty, vx, vy, n_classes, cfg.weight_decays, batchnorm=cfg.batchnorm,
                            solver=cfg.solver, max_iter=cfg.max_iter, epochs=cfg.epochs, lr=cfg.lr,
                            batch_size=cfg.batch_size, seed=cfg.seed)


def _sample_std(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).std(unbiased=True)) if len(values) > 1 else 0.0


def fit_fn(cfg: "ProbeConfig", probe: str, model: str, plan: tuple[dict[str, torch.Tensor], int],
           f: dict[str, torch.Tensor], order: tuple[str, str, str], seeds: list[int],
           subsets: list[torch.Tensor], *, knn: bool = False) -> Callable[[], dict[str, Outcome]]:
    """One linear-family probe (`lowshot`: every subset) or, with `knn`, one kNN probe of one model,
    on its pooled features `f` {split: [N, D]}."""
    (ys, n_classes), (tr, va, te) = plan, order

    def run() -> dict[str, Outcome]:
        if probe == "lowshot":
            accs, det = [], []
            for s, idx in zip(seeds, subsets):
                head = fit_head(cfg, f[tr][idx], ys[tr][idx], f[va], ys[va], n_classes)
                accs.append(head.top1(f[te], ys[te]))
                det.append({"seed": s, "weight_decay": head.weight_decay, "test_top1": accs[-1],
                            "val_top1": {str(k): v for k, v in head.val_top1.items()}})
            values = {model: float(sum(accs) / len(accs)), f"{model}_std": _sample_std(accs)}
            return {probe: Outcome(values, {"seeds": det})}
        if knn:
            acc = knn_top1(f[tr], ys[tr], f[te], ys[te], k=cfg.knn.k, temperature=cfg.knn.temperature,
                           n_classes=n_classes, standardise=True)
            return {probe: Outcome({model: acc}, {"k": cfg.knn.k, "temperature": cfg.knn.temperature})}
        head = fit_head(cfg, f[tr], ys[tr], f[va], ys[va], n_classes)
        pred = head.predict(f[te])
        detail = {"weight_decay": head.weight_decay, "val_top1": {str(k): v for k, v in head.val_top1.items()}}
        return {probe: Outcome({model: float((pred == ys[te]).float().mean())}, detail,
                               pred if probe == "linear" else None)}

    return run


def attentive_fn(cfg: "ProbeConfig", model: str, tok: dict[str, torch.Tensor], order: tuple[str, str, str],
                 labels: dict[str, tuple[torch.Tensor, torch.Tensor, int]], test_ys: dict[str, torch.Tensor],
                 width: int | None) -> Callable[[], dict[str, Outcome]]:
    """Every attentive probe of one model (`labels`: probe -> train labels, val labels, classes),
    trained in the same passes over its tokens {split: [N, T, D]}."""
    tr, va, te = order

    def run() -> dict[str, Outcome]:
        fitted = fit_attentive_probes(cfg.attentive, tok[tr], tok[va], labels, width=width, seed=cfg.seed,
                                      precision=cfg.precision)
        return {p: Outcome({model: fitted[p].top1(tok[te], test_ys[p])}, fitted[p].details(cfg.attentive))
                for p in labels}

    return run
