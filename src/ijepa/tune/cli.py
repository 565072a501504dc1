"""`python -m ijepa.tune apply-best | worker | show`: the hand-off to `dvc repro`, one more
worker process on a study, and a study's trials. Parameters come from the conf folders
through `ijepa.params`, as the Kedro pipelines resolve them."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

from ijepa.params import DEFAULT_CONF_DIRS, pretrain_mapping, probe_mapping, read_parameters

from .config import DEFAULT_STORAGE, load_tune_config
from .handoff import apply_best
from .storage import storage_for
from .study import study_summary
from .workers import run_worker, run_worker_spec, study_parent_run

__all__ = ["main"]

DESCRIPTION = ("Mask-ratio search with Optuna: short pretraining runs scored by a val-split probe; "
               "the winner handed to `dvc repro` through conf/base/parameters_tuned.yml.")


def _parser() -> argparse.ArgumentParser:
    conf = list(DEFAULT_CONF_DIRS)
    ap = argparse.ArgumentParser(prog="python -m ijepa.tune", description=DESCRIPTION)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("apply-best", help="write the best trial's masks to parameters_tuned.yml (for dvc repro)")
    a.add_argument("--dataset", required=True)
    a.add_argument("--storage", help="Optuna storage URL (default: tune.storage of the conf)")
    a.add_argument("--study", help="study name (default: tune.study_name, else ijepa-masks-<dataset>)")
    a.add_argument("--params-file", default="conf/base/parameters_tuned.yml")
    a.add_argument("--conf", nargs="*", default=conf)
    w = sub.add_parser("worker", help="join a study as one more worker process")
    w.add_argument("--spec", help="(internal) job spec written by run_study")
    w.add_argument("--index", type=int, default=None,
                   help="this worker's number: its sampler seed is seed + 1000 x index (default: from host and pid)")
    w.add_argument("--dataset")
    w.add_argument("--storage")
    w.add_argument("--n-trials", type=int, help="trials this worker runs")
    w.add_argument("--study-trials", type=int, help="instead: run trials until the study holds this many done "
                   "trials, a budget shared by every worker started so (exact; a dead worker's trial is re-run)")
    w.add_argument("--shards", help="shard folder (default data/02_shards/<dataset>)")
    w.add_argument("--work-dir", help="trial outputs (default data/07_tune/<dataset>)")
    w.add_argument("--conf", nargs="*", default=conf)
    s = sub.add_parser("show", help="print the study's trials")
    s.add_argument("--dataset", required=True)
    s.add_argument("--storage")
    s.add_argument("--study")
    s.add_argument("--conf", nargs="*", default=conf)
    return ap


def _mlflow_tracking_uri(path: str | Path = "conf/base/mlflow.yml") -> str | None:
    """kedro-mlflow's `server.mlflow_tracking_uri`, for a worker started outside Kedro."""
    import os

    import yaml

    p = Path(path)
    if not p.is_file():
        return None
    uri = ((yaml.safe_load(p.read_text()) or {}).get("server") or {}).get("mlflow_tracking_uri")
    # the Kedro resolver ${tracking_root:} of mlflow.yml (ijepa_kedro.settings.tracking_root)
    return uri.replace("${tracking_root:}", os.environ.get("DVC_ROOT") or ".") if isinstance(uri, str) else uri


def _machine_index() -> int:
    """A worker number from the host name and pid: workers started without --index on several
    machines must not share a sampler seed (they would propose the same points)."""
    import os
    import socket
    import zlib

    return (zlib.crc32(socket.gethostname().encode()) + os.getpid()) % 100_000


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.cmd == "worker" and args.spec:
        run_worker_spec(args.spec, args.index or 0, args.n_trials, args.study_trials)
        return 0

    params = read_parameters(args.conf)
    tune = dict(params.get("tune") or {})
    if args.cmd == "apply-best":
        info = apply_best(args.dataset, args.storage or tune.get("storage") or DEFAULT_STORAGE,
                          args.study or tune.get("study_name"), args.params_file)
        print(json.dumps(info, indent=2))
        print(f"wrote tuned_masks.{args.dataset} to {args.params_file}; `dvc repro` now re-runs pretrain@"
              f"{args.dataset} and what depends on it")
        return 0
    if args.cmd == "show":
        import optuna

        cfg = load_tune_config({**tune, "dataset": args.dataset, **({"storage": args.storage} if args.storage else {}),
                                **({"study_name": args.study} if args.study else {})})
        study = optuna.load_study(study_name=cfg.name, storage=storage_for(cfg.storage))
        for t in study.trials:
            print(t.number, t.state.name, t.value, t.params, t.user_attrs.get("fail_reason", ""))
        print(json.dumps(study_summary(study, cfg), indent=2, default=str))
        return 0
    # worker joining from the conf (another machine on a shared RDB storage)
    if not args.dataset:
        ap.error("worker needs --dataset (or --spec)")
    over = {"dataset": args.dataset, **({"storage": args.storage} if args.storage else {})}
    cfg = load_tune_config({**tune, **over})
    pre, probe = pretrain_mapping(params, args.dataset), probe_mapping(params, args.dataset)
    tracking = parent = None
    if cfg.mlflow:
        tracking = _mlflow_tracking_uri()
        parent = study_parent_run(cfg)
    shards = args.shards or f"data/02_shards/{args.dataset}"
    from ijepa.train_data import read_shard_info

    read_shard_info(shards, verify=True)  # once for this worker: its trials do not verify again
    run_worker(cfg, pre, probe, shards,
               args.work_dir or f"data/07_tune/{args.dataset}", args.n_trials if args.n_trials is not None else cfg.n_trials,
               tracking, parent, args.index if args.index is not None else _machine_index(), target=args.study_trials)
    return 0
