"""Four Optuna workers on one PostgreSQL storage (a real server, tests/services.py), one of them
SIGKILLed in the middle of a trial: the heartbeat marks its trial FAIL, Optuna's retry callback
queues the point again, another worker runs it, and the study ends with exactly the requested
number of done trials — none lost, none run twice.

The workers are started as the README starts them on several machines (`python -m ijepa.tune
worker --dataset D --storage postgresql+psycopg2://... --study-trials N`, here with a tiny
--conf); nobody creates the study first. The victim is the same command with checkpoint
saving patched to block at its first checkpoint (mid-trial) until the test kills it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_config
from services import create_database, wait_until

optuna = pytest.importorskip("optuna")

from ijepa import tune  # noqa: E402
from ijepa.tune.budget import budget_state  # noqa: E402

pytestmark = pytest.mark.slow

N_TRIALS, WORKERS = 6, 4
SPACE = {"pred_scale_min": [0.1, 0.2], "pred_scale_span": [0.0, 0.1], "enc_scale_min": [0.8, 1.0],
         "npred": [1, 2], "pred_aspect_min": [0.75, 1.0], "pred_aspect_max": [1.0, 1.5]}
PROBE = {"max_iter": 10, "weight_decays": [1e-3], "lowshot_per_class": 2, "lowshot_seeds": 1,
         "feature_batch_size": 64, "probes": ["linear"], "baselines": []}

VICTIM = r"""
import os, signal, sys
import ijepa.checkpoint as ckpt
real = ckpt.save_checkpoint
def save(state, ckpt_dir, step, keep_last=None):
    # the first checkpoint of the first trial: mid-trial (heartbeats still beating) until SIGKILL
    open(os.environ["VICTIM_MARKER"], "w").write(str(os.getpid()))
    signal.pause()
ckpt.save_checkpoint = save
from ijepa.tune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_four_postgres_workers_one_killed_mid_trial(tmp_path, postgres):
    import yaml

    from ijepa.data import shard_dataset

    shards = tmp_path / "shards"
    shard_dataset({"source": "scenes", "image_size": 16, "scenes": {"sizes": {"train": 32, "val": 16, "test": 8}}},
                  shards, progress=False)
    storage = create_database(postgres, "optuna_kill")
    # the parameters every worker reads (as conf/base on each machine): tiny, heartbeats in seconds
    base = tiny_config()
    base.pop("checkpoint_every")
    tune_block = {"n_trials": N_TRIALS, "study_name": "kill", "pruner": "none", "seed": 1, "max_train": 32,
                  "max_val": 16, "mlflow": False, "heartbeat_interval": 1, "grace_period": 4, "stale_retries": 1,
                  "trial": {"total_steps": 4, "eval_every": 2, "batch_size": 8}, "space": SPACE}
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "parameters.yml").write_text(yaml.safe_dump({
        "pretrain": {"common": base, "scenes": {}}, "probe": {"common": PROBE, "scenes": {}}, "tune": tune_block}))
    # the README's command, one per "machine" (here: process), all on the same PostgreSQL study
    args = ["worker", "--dataset", "scenes", "--storage", storage, "--study-trials", str(N_TRIALS),
            "--conf", str(conf), "--shards", str(shards), "--work-dir", str(tmp_path / "work")]
    marker = tmp_path / "victim.pid"
    logs = [open(tmp_path / f"worker{i}.log", "wb") for i in range(WORKERS)]
    procs = [subprocess.Popen([sys.executable, "-c", VICTIM, *args, "--index", "0"],
                              env={**_env(), "VICTIM_MARKER": str(marker)}, stdout=logs[0], stderr=subprocess.STDOUT)]
    procs += [subprocess.Popen([sys.executable, "-m", "ijepa.tune", *args, "--index", str(i)], env=_env(),
                               stdout=logs[i], stderr=subprocess.STDOUT) for i in range(1, WORKERS)]
    t0 = time.monotonic()
    try:
        wait_until(lambda: marker.exists() or procs[0].poll() is not None, 180, "the victim's first checkpoint")
        assert procs[0].poll() is None, (tmp_path / "worker0.log").read_text()
        os.kill(procs[0].pid, signal.SIGKILL)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for fh in logs:
            fh.close()
    seconds = time.monotonic() - t0
    out = "\n".join(f"--- worker{i}\n" + (tmp_path / f"worker{i}.log").read_text()[-2000:] for i in range(WORKERS))
    assert codes == [-signal.SIGKILL, 0, 0, 0], out

    trials = optuna.load_study(study_name="kill", storage=tune.storage_for(storage)).trials
    states = {s: [t for t in trials if t.state.name == s] for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    victim = f":{procs[0].pid}"
    failed = states["FAIL"]
    # the killed trial, failed by the heartbeat (no fail_reason: nothing raised, its worker vanished)
    assert len(failed) == 1 and failed[0].user_attrs["worker"].endswith(victim), out
    assert "fail_reason" not in failed[0].user_attrs
    # exactly the requested number of finished trials, none left running or waiting
    assert len(states["COMPLETE"]) == N_TRIALS and not states["RUNNING"] and not states["WAITING"], \
        [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert budget_state(trials).done == N_TRIALS
    # the killed point was re-run once, by another worker, and nothing else ran twice
    retries = [t for t in states["COMPLETE"] if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retries) == 1 and retries[0].params == failed[0].params
    assert not retries[0].user_attrs["worker"].endswith(victim)
    points = [tuple(sorted(t.params.items())) for t in states["COMPLETE"]]
    assert len(set(points)) == N_TRIALS, "a point finished twice"
    assert len(trials) == N_TRIALS + 1  # the requested trials and the killed one, nothing more
    print(f"\ntrials requested {N_TRIALS} / finished {len(states['COMPLETE'])} / failed {len(failed)} / "
          f"duplicated {N_TRIALS - len(set(points))}; workers {WORKERS}, one SIGKILLed; {seconds:.1f} s")
