"""MLflow tracking of pretraining: the active run in-process, and rank 0 of a torchrun job
attaching to the run named by MLFLOW_RUN_ID / MLFLOW_TRACKING_URI."""
from __future__ import annotations

import pytest

from ijepa.tracking import MlflowTracker, NullTracker, default_tracker, tracker_from_env
from ijepa.trainer import run_pretraining
from conftest import make_shards, tiny_config

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.slow


@pytest.fixture()
def tracking(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("pretrain-test")
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


def test_tracker_selection(monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    if mlflow.active_run() is None:
        assert isinstance(default_tracker(), NullTracker)
    assert isinstance(tracker_from_env(0), NullTracker)
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    assert isinstance(tracker_from_env(1), NullTracker)  # only rank 0 logs
    assert isinstance(tracker_from_env(0), MlflowTracker)


def test_in_process_and_torchrun_runs_log_to_mlflow(tmp_path, tracking):
    shards = make_shards(tmp_path / "shards", n=32, size=16, channels=1)
    client = mlflow.tracking.MlflowClient(tracking)
    cfg = tiny_config(optimisation={"total_steps": 4, "batch_size": 8}, log_every=2, checkpoint_every=10,
                      deterministic=False)
    with mlflow.start_run() as run:
        tracker = default_tracker()
        assert isinstance(tracker, MlflowTracker) and tracker.run_id == run.info.run_id
        run_pretraining(cfg, shards, tmp_path / "one", tracker=tracker)
    data = client.get_run(run.info.run_id).data
    assert data.params["optimisation.batch_size"] == "8" and data.params["derived.img_size"] == "16"
    assert data.tags["pretrain_status"] == "finished"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss.png", "loss.csv"} <= arts

    with mlflow.start_run() as run2:
        run_pretraining({**cfg, "nproc": 2}, shards, tmp_path / "two", tracker=MlflowTracker.active())
    hist = client.get_metric_history(run2.info.run_id, "loss")
    assert [m.step for m in hist] == [2, 4]  # logged once (rank 0), not per rank
    data2 = client.get_run(run2.info.run_id).data
    assert data2.tags["pretrain_status"] == "finished" and data2.params["derived.world_size"] == "2"
    assert mlflow.active_run() is None  # the tracker never touched the run stack
