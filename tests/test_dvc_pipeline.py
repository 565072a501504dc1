"""`dvc repro` on a copy of the project with tiny parameters (scenes only: `dvc repro probe@scenes`).

Checks the three lineage facts of the DVC chain, the MLflow runs it leaves, and that a
repro after a kill during pretraining resumes from the last checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY_MODEL = {"preset": "tiny", "encoder": {"embed_dim": 32, "depth": 2, "num_heads": 2},
              "predictor": {"embed_dim": 16, "depth": 1, "num_heads": 2}}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(KEDRO_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1", MPLBACKEND="Agg",
               MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false", PYTHONDONTWRITEBYTECODE="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _edit(path: Path, fn) -> None:
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _tiny(root: Path, total_steps: int = 6, checkpoint_every: int = 3) -> None:
    def shard(p):
        p["shard"]["common"]["preview"] = 4
        p["shard"]["scenes"]["image_size"] = 32
        p["shard"]["scenes"]["scenes"]["sizes"] = {"train": 64, "val": 32, "test": 32}

    def pretrain(p):
        c = p["pretrain"]["common"]
        c["model"] = TINY_MODEL
        c["optimisation"].update(batch_size=16, total_steps=total_steps, warmup_steps=1)
        c.update(checkpoint_every=checkpoint_every, log_every=1, threads=1)
        c["masks"]["min_keep"] = 4
        p["pretrain"]["scenes"].pop("optimisation", None)  # steps come from `common` only here
        p["pretrain"]["scenes"]["model"].pop("predictor", None)  # and the predictor from TINY_MODEL

    def probe(p):
        # n_last 1: the tiny encoder has 2 blocks, so no last-4-layer features
        p["probe"]["common"].update(max_iter=5, weight_decays=[0.001], lowshot_per_class=2,
                                    lowshot_seeds=2, feature_batch_size=64, n_last=1)
        p["probe"]["scenes"] = {}

    _edit(root / "conf/base/parameters_shard.yml", shard)
    _edit(root / "conf/base/parameters_pretrain.yml", pretrain)
    _edit(root / "conf/base/parameters_probe.yml", probe)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC copy of the tracked project files with tiny parameters."""
    root = tmp_path_factory.mktemp("proj")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("data/", "benchmarks/", "docs/")):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    _tiny(root)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return root


def test_repro_chain_noop_and_selective_reruns(project):
    dvc = [sys.executable, "-m", "dvc"]
    first = _run(dvc + ["repro", "probe@scenes"], project)
    assert _ran(first) == {"shard@scenes", "pretrain@scenes", "probe@scenes"}
    # the library's progress lines reach the console through Kedro's logging (conf/logging.yml);
    # the console handler wraps long messages, so only the start of the line is matched
    assert re.search(r"probe fit 1/\d+:", first), first[-3000:]
    probes = json.loads((project / "data/08_reporting/scenes/probes.json").read_text())
    assert set(probes["probes"]) == {"linear", "lowshot", "count", "depth"}
    assert {"ijepa", "random_init", "pixels"} <= set(probes["probes"]["count"])

    # nothing changed: nothing runs
    assert _ran(_run(dvc + ["repro", "probe@scenes"], project)) == set()

    # a probe parameter: only the probe stage
    _edit(project / "conf/base/parameters_probe.yml", lambda p: p["probe"]["common"].update(max_iter=6))
    assert _ran(_run(dvc + ["repro", "probe@scenes"], project)) == {"probe@scenes"}

    # a mask parameter: pretrain and probe, not shard
    _edit(project / "conf/base/parameters_pretrain.yml",
          lambda p: p["pretrain"]["common"]["masks"].update(min_keep=5))
    assert _ran(_run(dvc + ["repro", "probe@scenes"], project)) == {"pretrain@scenes", "probe@scenes"}
    summary = json.loads((project / "data/06_models/scenes/summary.json").read_text())
    assert summary["resumed_from_step"] is None  # other masks: a new run, not a resume

    # metrics and plots are readable by DVC
    shown = _run(dvc + ["metrics", "show", "--json"], project)
    assert "probes.json" in shown and "shard.json" in shown

    # the default remote is a local folder: push, lose the cache and outputs, pull them back
    _run(dvc + ["push"], project)
    assert any((project / "dvc-remote").rglob("*"))
    shutil.rmtree(project / "data/02_shards/scenes")
    shutil.rmtree(project / ".dvc/cache")
    _run(dvc + ["pull", "--with-deps", "probe@scenes"], project)
    assert (project / "data/02_shards/scenes/manifest.json").is_file()
    assert _ran(_run(dvc + ["repro", "probe@scenes"], project)) == set()

    # MLflow: one experiment for the dataset, stage runs with lineage tags
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("scenes")
    runs = client.search_runs([exp.experiment_id])
    stages = {r.data.tags.get("dvc_stage") for r in runs}
    assert {"shard@scenes", "pretrain@scenes", "probe@scenes"} <= stages
    pre = [r for r in runs if r.data.tags.get("dvc_stage") == "pretrain@scenes"]
    enc_shas = {r.data.tags.get("output.encoder_sha256") for r in pre}
    prb = [r for r in runs if r.data.tags.get("dvc_stage") == "probe@scenes"]
    assert {r.data.tags.get("input.encoder_sha256") for r in prb} & enc_shas
    shard_run = next(r for r in runs if r.data.tags.get("dvc_stage") == "shard@scenes")
    assert shard_run.data.tags["output.manifest_sha256"] in {r.data.tags.get("input.manifest_sha256") for r in pre}
    assert all(r.data.tags.get("git_commit") for r in runs)
    newest_probe = max(prb, key=lambda r: r.info.start_time)
    probes = json.loads((project / "data/08_reporting/scenes/probes.json").read_text())
    assert newest_probe.data.tags["input.encoder_sha256"] == probes["encoder_sha256"]
    assert newest_probe.data.metrics["probe.linear.ijepa"] == pytest.approx(probes["probes"]["linear"]["ijepa"], abs=1e-3)
    assert newest_probe.info.run_name == "probe"


def test_repro_after_kill_during_pretraining_resumes(project):
    """Kill `dvc repro` once a checkpoint exists; the next repro resumes from it."""
    _edit(project / "conf/base/parameters_pretrain.yml",
          lambda p: p["pretrain"]["common"].update(checkpoint_every=2) or
          p["pretrain"]["common"]["optimisation"].update(total_steps=400))
    ckpts = project / "data/06_models/scenes/checkpoints"
    shutil.rmtree(ckpts, ignore_errors=True)  # only checkpoints of this run count below
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "pretrain@scenes"], cwd=project, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if any(ckpts.glob("ckpt-*.pt")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "pretraining finished or failed before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # the same parameters: the stage runs again and continues from the newest checkpoint
    out = _run([sys.executable, "-m", "dvc", "repro", "pretrain@scenes"], project)
    assert "pretrain@scenes" in _ran(out)
    summary = json.loads((project / "data/06_models/scenes/summary.json").read_text())
    assert summary["resumed_from_step"] is not None and summary["resumed_from_step"] >= 2
    assert summary["steps"] == 400
