"""Trials on several processes: Optuna's own distributed mode, every worker on the same
storage. `run_study` writes a job spec and starts `python -m ijepa.tune worker --spec ...`
once per worker; a worker on another machine joins with `--dataset D --storage URL` and
finds the study's MLflow parent run in the study's user attribute `PARENT_ATTR`.

With a study-wide `target` (run_study with several workers, or `worker --study-trials N`)
the workers share one budget (`ijepa.tune.budget.run_until`): the study ends with exactly
that many done trials, and a worker that dies mid-trial costs nothing but time, as its
trial is failed by the heartbeat and re-run by another worker."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ijepa import atomic
from ijepa.config import as_dict

from .budget import run_until
from .config import TuneConfig, load_tune_config
from .storage import config_storage, open_study, storage_for

__all__ = ["PARENT_ATTR", "run_worker", "run_worker_spec", "worker_spec", "split_trials", "spawn_workers",
           "study_parent_run"]

log = logging.getLogger("ijepa.tune")

PARENT_ATTR = "mlflow_parent_run_id"


def run_worker(cfg: TuneConfig, base_pretrain: Mapping[str, Any], probe: Mapping[str, Any], shard_dir: str | Path,
               work_dir: str | Path, n_trials: int | None, tracking_uri: str | None, parent_run_id: str | None,
               worker_index: int = 0, threads: int | None = None, target: int | None = None) -> None:
    """One worker: open the study and run up to `n_trials` trials (or until the timeout);
    with `target`, run trials until the study holds `target` done trials (`n_trials` unused)."""
    if n_trials == 0 and target is None:
        return
    from .objective import Objective  # the training code (torch) only where trials run

    storage = config_storage(cfg)
    study = open_study(cfg, seed_offset=1000 * worker_index, storage=storage)
    objective = Objective(cfg, base_pretrain, probe, shard_dir, work_dir, tracking_uri, parent_run_id, threads)
    if target is not None:
        run_until(study, storage, objective, target, cfg.timeout_s, poll_s=min(5.0, cfg.heartbeat_interval))
        return
    study.optimize(objective, n_trials=n_trials, timeout=cfg.timeout_s, catch=(Exception,), gc_after_trial=True)


def worker_spec(cfg: TuneConfig, base_pretrain: Mapping[str, Any], probe: Mapping[str, Any], shard_dir: str | Path,
                work_dir: str | Path, tracking_uri: str | None, parent_run_id: str | None,
                threads: int | None, target: int | None = None) -> dict[str, Any]:
    """The JSON job spec a spawned worker reads (`run_worker_spec`); `target`: the study-wide
    number of done trials the workers share (None: each runs its own `--n-trials`)."""
    return {"tune": as_dict(cfg), "base_pretrain": dict(base_pretrain), "probe": dict(probe),
            "shard_dir": str(shard_dir), "work_dir": str(work_dir), "tracking_uri": tracking_uri,
            "parent_run_id": parent_run_id, "threads": threads, "target": target}


def run_worker_spec(spec_path: str | Path, index: int = 0, n_trials: int | None = None,
                    target: int | None = None) -> None:
    """`python -m ijepa.tune worker --spec ...`: run worker `index` of a spec from `spawn_workers`."""
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    cfg = load_tune_config(spec["tune"])
    n = n_trials if n_trials is not None else cfg.n_trials
    target = target if target is not None else spec.get("target")
    run_worker(cfg, spec["base_pretrain"], spec["probe"], spec["shard_dir"], spec["work_dir"], n,
               spec.get("tracking_uri"), spec.get("parent_run_id"), index, spec.get("threads"), target)


def split_trials(n: int | None, workers: int) -> list[int | None]:
    if n is None:
        return [None] * workers
    return [n // workers + (1 if i < n % workers else 0) for i in range(workers)]


def spawn_workers(spec: dict[str, Any], counts: list[int | None], work_dir: Path,
                  reached: Callable[[], bool] | None = None) -> None:
    """Start one worker process per entry of `counts` (its number of trials) and wait for all;
    RuntimeError when any exits with an error, the others are terminated on an interrupt.
    `reached()` True: the study has what it needs, so a worker that died is only a warning
    (its trial was failed by the heartbeat and re-run by another worker)."""
    spec_path = work_dir / f"worker-spec-{os.getpid()}-{int(time.time() * 1000)}.json"
    atomic.write_json(spec_path, spec)
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # src/ijepa/tune/workers.py -> src
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("MLFLOW_RUN_ID", None)
    threads = spec.get("threads") or 1
    env.setdefault("OMP_NUM_THREADS", str(threads))
    procs = []
    try:
        for i, n in enumerate(counts):
            cmd = [sys.executable, "-m", "ijepa.tune", "worker", "--spec", str(spec_path), "--index", str(i)]
            if n is not None:
                cmd += ["--n-trials", str(n)]
            log.info("starting tune worker %d: %s", i, " ".join(cmd))
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        raise
    finally:
        spec_path.unlink(missing_ok=True)
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if bad and reached is not None and reached():
        log.warning("tune workers exited with errors (index, exit code): %s; the other workers completed the "
                    "study", bad)
    elif bad:
        raise RuntimeError(f"tune workers exited with errors (index, exit code): {bad}")


def study_parent_run(cfg: TuneConfig) -> str | None:
    """The MLflow parent run recorded by `run_study` on the study (None: no study or no run)."""
    import optuna

    with contextlib.suppress(KeyError):
        return optuna.load_study(study_name=cfg.name, storage=storage_for(cfg.storage)).user_attrs.get(PARENT_ATTR)
    return None
