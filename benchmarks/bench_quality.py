"""Representation quality at equal compute: I-JEPA vs the MAE baseline vs random init vs pixels.

Per dataset (fashion_mnist: linear + 1% low-shot on `cls`; scenes: count + depth, plus linear
and low-shot on its `cls` label):

1. shard   `ijepa.data.shard_dataset` with the project's shard parameters
           (conf/base/parameters_shard.yml, common + dataset) into ``<work>/shards/<dataset>``
           (reused when the same config was sharded before);
2. budget  both methods get the SAME wall-clock budget for their training steps. How: a short
           calibration run of each method (``calib_steps`` steps, same config, thrown away)
           measures its steps/s on this machine (the total time of its log windows after the
           first, see `step_time`), then ``total_steps = budget_s * steps/s`` and
           the real run is a normal fixed-step run of that length (warm-up = the same fraction
           of it as in the project's parameters), so the lr / wd / EMA schedules are complete
           cosine/linear schedules, exactly as in a run of that length. The measured wall-clock
           of each run (`train_s`: step time from the trainer's log; `wall_s`: the whole call,
           including data loading and checkpoints) is recorded next to the budget, so a
           deviation caused by machine load is visible;
3. pretrain `ijepa.trainer.run_pretraining` with the project's pretraining parameters
           (conf/base/parameters_pretrain.yml common + dataset + tuned masks, resolved by
           `ijepa.params.pretrain_mapping`, so precision "auto" and the default context
           policy); ``method: mae`` for the MAE baseline (same encoder; its
           ``method_options`` default to 0.75 random masking and a light pixel decoder; same
           augmentation);
4. probe   `ijepa.probes.run_probes` on both exported encoders with the same probe config
           (project parameters, n_last 4 by default); random_init and pixels come from the
           I-JEPA call (random_init re-drawn per seed).

Seeds: ``seeds`` pretraining seeds (0, 1, ...) per method; each figure is the mean over seeds
with `<probe>_std` (sample std over pretraining seeds; for low-shot with one pretraining seed,
the std over its `lowshot_seeds` label subsets) and `n_seeds`. Seed k is also the probe seed, so
it draws the low-shot label subsets k, k+1, ...: the spread over seeds holds both. Targets (issue 7) are checked
and recorded, never asserted.

    python benchmarks/bench_quality.py --budget-s 1200            # the full run (about 2 h, see README)
    python benchmarks/bench_quality.py --quick --budget-s 30      # end-to-end smoke run, small data
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Mapping

from ijepa import atomic
from ijepa.config import deep_merge

__all__ = ["run", "run_dataset", "TARGETS", "DATASETS"]

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("fashion_mnist", "scenes")
METHODS = ("ijepa", "mae")
PROBES = {"fashion_mnist": ("linear", "lowshot"), "scenes": ("count", "depth", "linear", "lowshot")}
# issue 7: fashion_mnist linear >= 0.88 and 1% low-shot >= 0.80, and I-JEPA above MAE, random
# init and raw pixels on each; scenes: I-JEPA above the others on count and depth.
TARGETS = {"fashion_mnist": {"linear": 0.88, "lowshot": 0.80}, "scenes": {"count": None, "depth": None}}
QUICK_SIZES = {"fashion_mnist": {"train": 3000, "val": 500, "test": 1000},
               "scenes": {"train": 1500, "val": 300, "test": 500}}

log = logging.getLogger("bench_quality")


def _params() -> dict:
    """The project's parameter files (conf/base only: a benchmark does not follow local edits)."""
    from ijepa.params import read_parameters

    return read_parameters([ROOT / "conf" / "base"])


def shard_config(dataset: str, quick: bool) -> dict:
    from ijepa.params import shard_mapping

    cfg = shard_mapping(_params(), dataset)
    fields = _shard_fields()
    cfg = {k: v for k, v in cfg.items() if k in fields}  # pipeline-only keys dropped
    if quick:
        cfg["max_samples"] = dict(QUICK_SIZES[dataset])
        if dataset == "scenes":  # generate only what is used
            cfg = deep_merge(cfg, {"scenes": {"sizes": dict(QUICK_SIZES[dataset])}})
    return cfg


def _shard_fields() -> set[str]:
    import dataclasses

    from ijepa.data import ShardConfig

    return {f.name for f in dataclasses.fields(ShardConfig)}


def pretrain_config(dataset: str, method: str, seed: int, overrides: Mapping[str, Any] | None = None) -> dict:
    """The project's pretraining mapping for `dataset` (common + dataset + tuned masks, by
    `ijepa.params.pretrain_mapping`), then the bench's settings, then `overrides`."""
    from ijepa.params import pretrain_mapping

    bench = {"method": method, "seed": seed, "progress": False, "nproc": 1}
    return deep_merge(pretrain_mapping(_params(), dataset, bench), dict(overrides or {}))


def probe_config(dataset: str, overrides: Mapping[str, Any] | None = None) -> dict:
    from ijepa.params import probe_mapping

    bench = {"n_last": 4, "probes": list(PROBES[dataset])}
    return deep_merge(probe_mapping(_params(), dataset, bench), dict(overrides or {}))


def ensure_shards(dataset: str, work: Path, quick: bool) -> Path:
    from ijepa.data import shard_dataset

    cfg = shard_config(dataset, quick)
    out = work / "shards" / (dataset + ("_quick" if quick else ""))
    stamp = out / "bench_shard_config.json"
    if (out / "manifest.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == cfg:
        return out
    if out.exists():
        shutil.rmtree(out)
    shard_dataset(cfg, out, progress=False)
    atomic.write_json(stamp, cfg)
    return out


def step_time(rows: list[Mapping[str, Any]], batch: int, skip_windows: int = 0) -> tuple[float, int]:
    """(seconds, images) of the training steps, from a run's loss-history rows (one per log
    window: its step and the window's img/s), skipping the first `skip_windows` windows (start-up).
    Summing each window's time is the true rate (total images / total time); a median of the
    windows' rates is not: it put a 7,020-step MAE run (scenes) at 1,420 s of steps when the
    whole call, loading and checkpoints included, took 1,370 s."""
    seconds, images, prev = 0.0, 0, 0
    for i, row in enumerate(rows):
        step, ips = int(row["step"]), row.get("img_per_s")
        n = (step - prev) * batch
        prev = step
        if i < skip_windows:
            continue
        if ips in (None, "") or not math.isfinite(float(ips)) or float(ips) <= 0:
            raise RuntimeError(f"log window ending at step {step} has no images/s ({ips!r})")
        seconds += n / float(ips)
        images += n
    if images == 0:
        raise RuntimeError(f"no timed log windows after skipping {skip_windows} of {len(rows)}")
    return seconds, images


def _history(summary: Mapping[str, Any]) -> list[dict]:
    """The loss-history rows of a finished run (the CSV its summary names)."""
    import csv

    with open(summary["loss_csv"], newline="") as f:
        return list(csv.DictReader(f))


def pretrain_for_budget(dataset: str, method: str, seed: int, shards: Path, work: Path, budget_s: float,
                        calib_steps: int, overrides: Mapping[str, Any] | None = None) -> dict:
    """Calibrate steps/s, then one fixed-length run whose steps fill `budget_s`; returns its facts."""
    from ijepa.train_config import load_config
    from ijepa.trainer import run_pretraining

    base = pretrain_config(dataset, method, seed, overrides)
    batch = int(load_config(base).optimisation.batch_size)
    o = base.get("optimisation", {})
    warm_frac = (o.get("warmup_steps") / o["total_steps"]) if o.get("warmup_steps") and o.get("total_steps") else 0.1
    tag = f"{dataset}/{method}/seed{seed}"
    calib_dir = work / "calib" / tag
    shutil.rmtree(calib_dir, ignore_errors=True)
    # log windows of calib_steps // 6 steps; the first (start-up: loader, allocator) is not timed
    window = max(1, calib_steps // 6)
    calib = deep_merge(base, {"optimisation": {"total_steps": calib_steps, "warmup_steps": 1},
                              "log_every": window, "checkpoint_every": 10 ** 9, "data": {"verify": False}})
    c_s, c_img = step_time(_history(run_pretraining(calib, shards, calib_dir)), batch,
                           skip_windows=1 if calib_steps > window else 0)
    sps = c_img / batch / c_s
    total = max(calib_steps, int(budget_s * sps))
    cfg = deep_merge(base, {"optimisation": {"total_steps": total, "warmup_steps": max(1, int(warm_frac * total))},
                            "log_every": max(1, min(50, total // 20)), "checkpoint_every": max(1, total // 4)})
    run_dir = work / "runs" / tag
    shutil.rmtree(run_dir, ignore_errors=True)  # a new budget is a new run (no resume across lengths)
    t0 = time.perf_counter()
    summary = run_pretraining(cfg, shards, run_dir)
    wall = time.perf_counter() - t0
    train_s, images = step_time(_history(summary), batch)
    shutil.rmtree(calib_dir, ignore_errors=True)
    return {"encoder_dir": summary["encoder_dir"], "steps": total, "calib_steps_per_s": round(sps, 3),
            "train_s": round(train_s, 1), "wall_s": round(wall, 1), "img_per_s": round(images / train_s, 1),
            # < 1: the run stepped slower than its calibration, so it overshot the budget
            "rate_vs_calibration": round(images / batch / train_s / sps, 3), "epochs": round(summary["epochs"], 3),
            "final_loss": summary.get("final_loss"), "collapse_warnings": summary.get("collapse_warnings"),
            "batch_size": batch}


def _agg(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_dataset(dataset: str, budget_s: float = 1200.0, seeds: int = 1, quick: bool = False,
                work: str | Path = "data/09_bench", calib_steps: int = 60,
                pretrain_overrides: Mapping[str, Any] | None = None,
                probe_overrides: Mapping[str, Any] | None = None) -> dict:
    from ijepa.probes import run_probes

    work = Path(work)
    if not work.is_absolute():
        work = ROOT / work
    t_start = time.perf_counter()
    shards = ensure_shards(dataset, work, quick)
    pcfg = probe_config(dataset, probe_overrides)
    per_seed: dict[str, list[dict]] = {m: [] for m in (*METHODS, "random_init", "pixels")}
    pretrain: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in range(seeds):
        for method in METHODS:
            facts = pretrain_for_budget(dataset, method, seed, shards, work, budget_s, calib_steps, pretrain_overrides)
            pretrain[method].append(facts)
            baselines = ["random_init", "pixels"] if method == "ijepa" else []
            if seed > 0 and method == "ijepa":
                baselines = ["random_init"]  # pixels do not depend on the seed
            cfg = deep_merge(pcfg, {"baselines": baselines, "seed": seed})
            metrics, _ = run_probes(cfg, facts["encoder_dir"], shards, work / "cache" / dataset, progress=False)
            models = {method: "ijepa", **{b: b for b in baselines}}
            for name, key in models.items():
                row = {}
                for probe, vals in metrics["probes"].items():
                    row[probe] = vals[key]
                    if probe == "lowshot":
                        row["lowshot_subset_std"] = vals.get(f"{key}_std", 0.0)
                        row["lowshot_subsets"] = vals.get("seeds")
                per_seed[name].append(row)
    out: dict[str, Any] = {"budget_s": budget_s, "seeds": seeds, "quick": quick, "probes": list(PROBES[dataset]),
                           "n_last": pcfg["n_last"]}
    for name, rows in per_seed.items():
        if not rows:
            continue
        entry: dict[str, Any] = {"n_seeds": len(rows)}
        for probe in PROBES[dataset]:
            vals = [r[probe] for r in rows if probe in r]
            if not vals:
                continue
            mean, std = _agg(vals)
            if probe == "lowshot" and len(vals) == 1:
                std = rows[0].get("lowshot_subset_std", 0.0)  # spread over the label subsets
            entry[probe] = round(mean, 4)
            entry[f"{probe}_std"] = round(std, 4)
            entry[f"{probe}_per_seed"] = [round(v, 4) for v in vals]
        if name in pretrain:
            entry["pretrain"] = pretrain[name]
        out[name] = entry
    out["targets"] = check_targets(dataset, out)
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    return out


def check_targets(dataset: str, res: Mapping[str, Any]) -> dict:
    """Each target of the issue: the threshold (if any), I-JEPA's figure, and whether it is met."""
    out = {}
    for probe, threshold in TARGETS[dataset].items():
        mine = res.get("ijepa", {}).get(probe)
        if mine is None:
            continue
        others = {m: res[m][probe] for m in ("mae", "random_init", "pixels") if probe in res.get(m, {})}
        above = all(mine > v for v in others.values())
        met = above and (threshold is None or mine >= threshold)
        out[probe] = {"threshold": threshold, "ijepa": mine, "above_all_baselines": above, "met": met}
    return out


def run(datasets: tuple[str, ...] = DATASETS, budget_s: float = 1200.0, seeds: int = 1, quick: bool = False,
        work: str | Path = "data/09_bench", calib_steps: int | None = None, **kw) -> dict:
    calib = calib_steps if calib_steps is not None else (6 if quick else 60)
    return {ds: run_dataset(ds, budget_s, seeds, quick, work, calib, **kw) for ds in datasets}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--budget-s", type=float, default=1200.0, help="training seconds per method per dataset")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small datasets (a smoke run)")
    ap.add_argument("--work", default="data/09_bench")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run(tuple(a.datasets), a.budget_s, a.seeds, a.quick, a.work), indent=2))
