"""ijepa.tracking_buffer without a server: calls return at once while nothing listens; what
cannot be sent by the end goes to a fallback file that `replay_fallback` sends later."""
from __future__ import annotations

import logging
import time

import pytest

from ui_helpers import free_port

mlflow = pytest.importorskip("mlflow")


def test_unreachable_server_fallback_file_then_replay(tmp_path, monkeypatch, caplog):
    from ijepa.tracking import MlflowTracker
    from ijepa.tracking_buffer import BufferedTracker, replay_fallback

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(store)
    run_id = client.create_run(client.create_experiment("gone")).info.run_id
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast: nothing listens on the port
    dead = f"http://127.0.0.1:{free_port()}"
    fallback = tmp_path / "run" / "tracking_fallback.jsonl"
    caplog.set_level(logging.INFO, "ijepa.tracking_buffer")
    buf = BufferedTracker(MlflowTracker(run_id, dead), fallback, flush_timeout_s=1.0, retry_s=0.2)
    t0 = time.monotonic()
    for step in range(1, 4):
        buf.log_metrics({"loss": 1.0 / step}, step)
    buf.set_tag("pretrain_status", "finished")
    assert time.monotonic() - t0 < 0.5  # the caller never waits for the server
    buf.close()
    assert len(fallback.read_text().splitlines()) == 4
    warned = [r.getMessage() for r in caplog.records if r.name == "ijepa.tracking_buffer" and r.levelname == "WARNING"]
    assert len(warned) == 2, warned  # one for the outage, one at the end naming the file
    assert "unreachable" in warned[0] and str(fallback) in warned[1]
    # later (the server back; here: the same run read from its store directly)
    assert replay_fallback(fallback, tracking_uri=store) == 4 and not fallback.exists()
    hist = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in hist] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert client.get_run(run_id).data.tags["pretrain_status"] == "finished"
