"""Pretraining entry point for one process; torchrun launches it once per rank.

    python -m ijepa.pretrain_main --config cfg.json --shards DIR --out DIR [--loss-csv PATH] [--probes-csv PATH]
    torchrun --standalone --nproc_per_node 2 -m ijepa.pretrain_main --config cfg.json --shards DIR --out DIR

The config file is JSON (or YAML) holding a PretrainConfig mapping; its `nproc` must equal
the number of processes torchrun starts (WORLD_SIZE, all nodes together). Rank 0 logs to
the MLflow run named by MLFLOW_RUN_ID / MLFLOW_TRACKING_URI when set. On an error, the
failing rank writes ``<out>/failure-rank<r>.json`` (type and message) for the launcher.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from ijepa import atomic
from ijepa.distributed import cleanup, init_from_env
from ijepa.tracking import tracker_from_env


def _read_config(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yml", ".yaml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ijepa.pretrain_main", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="JSON/YAML file with the PretrainConfig mapping")
    p.add_argument("--shards", required=True, help="shard folder (with manifest.json)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, encoder, loss.csv, summary.json")
    p.add_argument("--loss-csv", default=None, help="loss history CSV path (default <out>/loss.csv)")
    p.add_argument("--probes-csv", default=None, help="probes-along-training CSV path (default <out>/probes.csv)")
    p.add_argument("--skip-verify", action="store_true", help="do not re-check the shards' sha256 (the "
                   "launcher did)")
    return p.parse_args(argv)


@record
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from ijepa.trainer import prepare, train_worker

    rank = int(os.environ.get("RANK", "0"))
    info = None
    try:
        plan = prepare(_read_config(args.config), args.shards, verify=False if args.skip_verify else None)
        info = init_from_env(plan.cfg.device)
        if info.rank != 0:
            logging.getLogger().setLevel(logging.WARNING)
        tracker = tracker_from_env(info.rank)
        train_worker(plan, args.out, tracker, args.loss_csv, info, probes_csv=args.probes_csv)
    except BaseException as err:
        if not isinstance(err, (KeyboardInterrupt, SystemExit)):
            atomic.write_json(Path(args.out) / f"failure-rank{rank}.json",
                              {"rank": rank, "type": type(err).__name__, "message": str(err)})
        raise
    finally:
        if info is not None:
            cleanup(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
