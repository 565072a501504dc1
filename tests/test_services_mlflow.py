"""A real `mlflow server` with a PostgreSQL backend store (tests/services.py) and a local
artifact root, on 127.0.0.1:

- the default job's stages (shard, pretrain as a 2-process torchrun job, probe; tiny
  parameters, Kedro + kedro-mlflow as `dvc repro` runs them) log to it over HTTP: runs,
  metrics and artifacts are all there afterwards, rows in PostgreSQL, files in the root;
- training survives its tracker (ijepa.tracking_buffer): the server is stopped in the middle
  of a pretraining run and started again on the same port; training goes on, warns once,
  and the loss history in MLflow has no gap. The outage is placed deterministically: the
  training child waits at two steps for the test (gates in files).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, copy_project, make_shards, tiny_config
from services import MlflowServer, create_database, wait_until

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.slow

TOTAL, DOWN_AT, UP_AT = 12, 4, 9  # the server is down while steps 5..9 run


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    backend = create_database(postgres, "mlflow")
    with MlflowServer(backend, tmp_path_factory.mktemp("mlflow-server")) as srv:
        srv.backend_pg = postgres
        yield srv


def _env(**extra) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
           "MPLBACKEND": "Agg", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "PYTHONDONTWRITEBYTECODE": "1"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def _project(root: Path, tracking_uri: str) -> Path:
    """A copy of the tracked project files with the tiny parameters of test_dvc_pipeline,
    nproc 2, and kedro-mlflow pointed at the server in conf/local/mlflow.yml."""
    from test_dvc_pipeline import _edit, _tiny

    copy_project(root)
    _tiny(root)
    _edit(root / "conf/base/parameters_pretrain.yml", lambda p: p["pretrain"]["common"].update(nproc=2))
    # as the README says: the tracking server goes in conf/local/mlflow.yml
    (root / "conf/local").mkdir(parents=True, exist_ok=True)
    (root / "conf/local/mlflow.yml").write_text(yaml.safe_dump({"server": {"mlflow_tracking_uri": tracking_uri}}))
    return root


# `kedro run --pipeline <stage> --params dataset=scenes` for the three stages, as dvc.yaml runs
# them, in one interpreter (what `kedro run` does inside; saves two start-ups of Kedro and torch)
STAGES = r"""
import sys
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
bootstrap_project(sys.argv[1])
for stage in ("shard", "pretrain", "probe"):
    with KedroSession.create(project_path=sys.argv[1], runtime_params={"dataset": "scenes"}) as session:
        session.run(pipeline_names=[stage])
"""


def test_default_job_stages_and_torchrun_log_to_server_on_postgres(server, tmp_path):
    project = _project(tmp_path / "proj", server.url)
    proc = subprocess.run([sys.executable, "-c", STAGES, str(project)], cwd=project, env=_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert not (project / "mlflow.db").exists()  # nothing went to the default sqlite store

    client = mlflow.MlflowClient(server.url)
    exp = client.get_experiment_by_name("scenes")
    runs = {r.data.tags["dvc_stage"] if "dvc_stage" in r.data.tags else r.info.run_name: r
            for r in client.search_runs([exp.experiment_id])}
    assert {r.info.run_name for r in runs.values()} >= {"shard", "pretrain", "probe"}
    by_name = {r.info.run_name: r for r in runs.values()}
    assert all(by_name[n].info.status == "FINISHED" for n in ("shard", "pretrain", "probe"))
    pre = by_name["pretrain"]
    assert pre.data.params["pretrain.common.nproc"] == "2"
    steps = [m.step for m in client.get_metric_history(pre.info.run_id, "loss")]
    assert steps == list(range(1, 7))  # log_every 1, 6 steps: logged once, by rank 0 of the torchrun job
    assert client.get_run(pre.info.run_id).data.params["derived.world_size"] == "2"
    pre_arts = {a.path for a in client.list_artifacts(pre.info.run_id)}
    assert {"pretrain_loss.csv", "loss.png", "encoder"} <= pre_arts, pre_arts
    assert "probe.linear.ijepa" in by_name["probe"].data.metrics
    assert client.list_artifacts(by_name["shard"].info.run_id) and client.list_artifacts(by_name["probe"].info.run_id)
    assert by_name["probe"].data.tags["input.encoder_sha256"] == pre.data.tags["output.encoder_sha256"]

    # where it all lives: rows in PostgreSQL, files under the server's local artifact root
    import psycopg2

    pg = server.backend_pg
    with psycopg2.connect(host=pg["host"], port=pg["port"], user=pg["user"], password=pg["password"],
                          dbname="mlflow") as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(exp.experiment_id),))
        assert cur.fetchone()[0] == len(runs)
        cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'loss'", (pre.info.run_id,))
        assert cur.fetchone()[0] == 6
    stored = {p.name for p in (server.workdir / "artifacts").rglob("*") if p.is_file()}
    assert {"pretrain_loss.csv", "loss.png", "encoder.safetensors"} <= stored


CHILD = r"""
import json, logging, sys, time
from pathlib import Path
import ijepa.trainer.loop as loop
from ijepa.tracking import MlflowTracker
from ijepa.trainer import run_pretraining
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
cfg, shards, out, gate, run_id, uri = json.loads(sys.argv[1]), *sys.argv[2:7]
down_at, up_at = int(sys.argv[7]), int(sys.argv[8])
real = loop.Trainer.train_step
def wait(name):
    (Path(gate) / f"at_{name}").touch()
    while not (Path(gate) / name).exists():
        time.sleep(0.05)
def train_step(self, step, images=None):
    if step == down_at:
        wait("down")
    if step == up_at:
        wait("up")
    return real(self, step, images)
loop.Trainer.train_step = train_step
run_pretraining(cfg, shards, out, tracker=MlflowTracker(run_id, uri))
"""


def test_server_stops_mid_run_and_returns_no_gap_one_warning(server, tmp_path):
    shards = make_shards(tmp_path / "shards", n=32, size=16, channels=1)
    cfg = tiny_config(optimisation={"total_steps": TOTAL, "batch_size": 8}, log_every=1, checkpoint_every=100,
                      deterministic=False)
    gate = tmp_path / "gate"
    gate.mkdir()
    client = mlflow.MlflowClient(server.url)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    # MLflow's own HTTP retries off in the child: each send attempt fails fast, the buffer retries
    env = _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    with open(tmp_path / "child.log", "wb") as log:
        child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg), str(shards), str(tmp_path / "out"),
                                  str(gate), run_id, server.url, str(DOWN_AT), str(UP_AT)],
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: (gate / "at_down").exists() or child.poll() is not None, 120, "step 4")
            server.stop(crash=True)  # as a crash: SIGKILL, no goodbye to open connections
            (gate / "down").touch()
            # the training goes on while the server is down: it reaches step 9 with nobody listening
            wait_until(lambda: (gate / "at_up").exists() or child.poll() is not None, 120, "step 9")
            assert child.poll() is None, (tmp_path / "child.log").read_text()
            server.start()
            (gate / "up").touch()
            assert child.wait(timeout=180) == 0, (tmp_path / "child.log").read_text()
        finally:
            if child.poll() is None:
                child.kill()
            if server.proc is None:
                server.start()  # for the other tests of the module
    text = (tmp_path / "child.log").read_text()
    history = client.get_metric_history(run_id, "loss")
    run = client.get_run(run_id)
    arts = {a.path for a in client.list_artifacts(run_id)}

    from ijepa.monitor import LossHistory

    csv = LossHistory.read_csv(tmp_path / "out" / "loss.csv")
    assert [int(r["step"]) for r in csv] == list(range(1, TOTAL + 1))
    got = sorted((m.step, m.value) for m in history)
    assert [s for s, _ in got] == list(range(1, TOTAL + 1)), "loss history in MLflow has a gap"
    assert [v for _, v in got] == pytest.approx([r["loss"] for r in csv], rel=1e-6)
    assert text.count("unreachable") == 1, text  # one warning for the outage
    assert "reachable again" in text, text
    assert run.data.tags["pretrain_status"] == "finished" and {"loss.csv", "loss.png"} <= arts
    assert not (tmp_path / "out" / "tracking_fallback.jsonl").exists()
    print(f"\nloss points sent {TOTAL} ({UP_AT - DOWN_AT} logged while the server was down), received {len(got)}")
