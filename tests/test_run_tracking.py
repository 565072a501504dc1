"""MLflow runs a killed process left RUNNING are ended by the next start (ijepa.stale_runs, the tune
objective's orphan trial runs), and an encoder's pretraining parameters become `pretrain.*` params."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from conftest import tiny_config


@pytest.fixture
def client(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def _dead_process_tag() -> str:
    """The process tag of a process that has since ended (taken while it ran)."""
    from ijepa.stale_runs import process_tag

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tag = process_tag(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    return tag


def test_runs_of_dead_processes_are_marked_killed_and_only_those(client):
    from ijepa.stale_runs import PROCESS_TAG, STALE_TAG, mark_dead_runs, process_alive, process_tag

    eid = client.create_experiment("scenes")
    dead_tag = _dead_process_tag()
    assert process_alive(dead_tag) is False and process_alive(process_tag()) is True
    tags = {"dead": dead_tag, "alive": process_tag(), "other_host": f"not-{socket.gethostname()}:1:1.00"}
    runs = {name: client.create_run(eid, run_name=name, tags={PROCESS_TAG: tag}).info.run_id
            for name, tag in tags.items()}
    runs["untagged"] = client.create_run(eid, run_name="untagged").info.run_id
    finished = client.create_run(eid, run_name="finished", tags={PROCESS_TAG: dead_tag}).info.run_id
    client.set_terminated(finished, "FINISHED")

    assert mark_dead_runs(client, [eid]) == [runs["dead"]]
    status = {name: client.get_run(rid).info.status for name, rid in runs.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "other_host": "RUNNING", "untagged": "RUNNING"}
    assert dead_tag in client.get_run(runs["dead"]).data.tags[STALE_TAG]
    assert client.get_run(finished).info.status == "FINISHED"
    assert mark_dead_runs(client, [eid]) == []  # nothing left to do


def test_a_pid_reused_by_another_process_counts_as_dead():
    from ijepa.stale_runs import process_alive, process_tag

    host, pid, started = process_tag().split(":")
    assert process_alive(f"{host}:{pid}:{float(started) - 1000:.2f}") is False


def test_orphan_trial_runs_end_with_their_trial_state(tmp_path):
    import optuna

    from ijepa.stale_runs import PROCESS_TAG, process_tag
    from ijepa.tracking import create_run
    from ijepa.tune.objective import end_orphan_trial_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = create_run(tracking_uri=uri, experiment="fashion_mnist", run_name="tune")
    study = optuna.create_study()
    failed, running = study.ask(), study.ask()
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    # a worker on another machine ran the failed trial and was lost; this one still runs its trial
    other = f"not-{socket.gethostname()}:1:1.00"
    runs = {t.number: create_run(tracking_uri=uri, parent_run_id=parent.run_id, run_name=f"trial-{t.number}",
                                 tags={"optuna.trial": str(t.number), PROCESS_TAG: other})
            for t in (failed, running)}
    assert runs[running.number].client.get_run(runs[running.number].run_id).data.tags[PROCESS_TAG] == other

    ended = end_orphan_trial_runs(study, uri, parent.run_id)
    client = parent.client
    assert ended == [runs[failed.number].run_id]
    assert client.get_run(runs[failed.number].run_id).info.status == "FAILED"
    assert client.get_run(runs[failed.number].run_id).data.tags["trial_state"] == "FAIL"
    assert client.get_run(runs[running.number].run_id).info.status == "RUNNING"


def test_pretraining_params_of_an_encoder():
    from ijepa.tracking import pretraining_params
    from ijepa.train_config import load_config

    cfg = load_config(tiny_config(masks={"npred": 3})).to_dict()
    info = {"encoder": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
            "metadata": {"config": cfg, "step": 12, "dataset": "blobs"}}
    params = pretraining_params(info)
    assert params["pretrain.masks.npred"] == "3" and params["pretrain.steps"] == "12"
    assert params["pretrain.method"] == "ijepa" and params["pretrain.encoder.embed_dim"] == "32"
    assert params["pretrain.optimisation.lr"] == str(cfg["optimisation"]["lr"])
    assert "None" not in params.values()
    # an imported encoder has no pretraining config: nothing to log
    assert pretraining_params({"encoder": info["encoder"], "metadata": {"source": {"format": "timm"}}}) == {}
