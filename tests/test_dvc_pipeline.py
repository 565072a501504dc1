"""`dvc repro` on a copy of the project with tiny parameters (scenes only: `dvc repro probe@scenes`).

Checks the three lineage facts of the DVC chain, the MLflow runs it leaves, DVC experiments
(`dvc exp run -S`, queued ones, `dvc exp show` / `dvc metrics diff` / `dvc plots diff` over the
git-kept reports/), the probe run as a comparable MLflow row, and that a repro after a kill during
pretraining resumes from the last checkpoint and marks the killed run KILLED.
"""
from __future__ import annotations

import contextlib
import itertools
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

from conftest import ROOT, copy_project

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


def _run_json(cmd: list[str], cwd: Path):
    """A command's stdout as JSON (DVC writes its warnings to stderr)."""
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


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
        # probes along training stay on (the CSV, the metrics): cheap heads, last layer (2 blocks)
        c["monitor"].update(max_train=64, max_val=32, probe={"n_last": 1, "max_iter": 5, "weight_decays": [0.001]})
        p["pretrain"]["scenes"].pop("optimisation", None)  # steps come from `common` only here
        p["pretrain"]["scenes"]["model"].pop("predictor", None)  # and the predictor from TINY_MODEL

    def probe(p):
        # n_last 1: the tiny encoder has 2 blocks, so no last-4-layer features
        p["probe"]["common"].update(max_iter=5, weight_decays=[0.001], lowshot_per_class=2,
                                    lowshot_seeds=2, feature_batch_size=64, n_last=1)
        p["probe"]["common"]["attentive"].update(epochs=2, warmup_epochs=1)
        p["probe"]["scenes"] = {}

    _edit(root / "conf/base/parameters_shard.yml", shard)
    _edit(root / "conf/base/parameters_pretrain.yml", pretrain)
    _edit(root / "conf/base/parameters_probe.yml", probe)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC copy of the tracked project files with tiny parameters."""
    root = tmp_path_factory.mktemp("proj")
    copy_project(root, skip=("data/", "benchmarks/", "docs/"))
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
    probes = json.loads((project / "reports/scenes/probes.json").read_text())
    assert set(probes["probes"]) == {"linear", "lowshot", "count", "depth", "attentive_cls", "attentive_count",
                                     "attentive_depth", "knn_cls", "knn_count", "knn_depth"}
    for row in ("count", "attentive_depth", "knn_cls"):
        assert {"ijepa", "random_init", "pixels"} <= set(probes["probes"][row])

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
    probes = json.loads((project / "reports/scenes/probes.json").read_text())
    assert newest_probe.data.tags["input.encoder_sha256"] == probes["encoder_sha256"]
    assert newest_probe.data.metrics["probe.linear.ijepa"] == pytest.approx(probes["probes"]["linear"]["ijepa"], abs=1e-3)
    assert newest_probe.info.run_name == "probe"


REPORTS = {"shard.json", "pretrain.json", "pretrain_loss.csv", "pretrain_probes.csv", "predictor_viz.json", "probes.json", "probe_table.json"}
NPRED = "conf/base/parameters_pretrain.yml:pretrain.scenes.masks.npred"


def _git(project: Path, *args: str) -> str:
    return _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], project)


def _exp_rows(shown: list) -> list[dict]:
    """Every revision of `dvc exp show --json` (baseline, workspace, experiments) as
    {"name", "rev", "params": {file: {...}}, "metrics": {file: {...}}}."""
    rows = []

    def walk(node):
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and "rev" in data:
                rows.append({"name": node.get("name") or data.get("name"), "rev": data["rev"],
                             "params": {f: (v or {}).get("data", {}) for f, v in (data.get("params") or {}).items()},
                             "metrics": {f: (v or {}).get("data", {}) for f, v in (data.get("metrics") or {}).items()}})
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(shown)
    return rows


def _npred(row: dict):
    return row["params"].get("conf/base/parameters_pretrain.yml", {}).get("pretrain", {}).get("scenes", {}) \
        .get("masks", {}).get("npred")


@pytest.fixture(scope="module")
def experiments(project) -> dict:
    """The baseline committed (reports/ with it, by git), then two DVC experiments: a queued probe
    change (`dvc exp run --queue` + `dvc queue start`) and a workspace run of npred=2."""
    dvc = [sys.executable, "-m", "dvc"]
    _run(dvc + ["repro", "probe@scenes"], project)  # the baseline (a no-op after the chain test)
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "baseline")
    tracked = set(_git(project, "ls-files", "reports/scenes").split())
    queued_name, ws_name = "probe-iter7", "npred2"
    _run(dvc + ["exp", "run", "--queue", "-n", queued_name, "-S",
                "conf/base/parameters_probe.yml:probe.common.max_iter=7", "probe@scenes"], project)
    ws_out = _run(dvc + ["exp", "run", "-n", ws_name, "-S", f"{NPRED}=2", "probe@scenes"], project)
    _run(dvc + ["queue", "start"], project)
    deadline = time.monotonic() + 600  # bounded wait for the queue worker (a tiny probe run)
    status = ""
    while time.monotonic() < deadline:
        status = _run(dvc + ["queue", "status"], project)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(1)
    queue_log = _run(dvc + ["queue", "logs", queued_name], project)
    return {"tracked": tracked, "ws_out": ws_out, "ws_name": ws_name, "queued_name": queued_name,
            "queue_status": status, "queue_log": queue_log}


def test_dvc_experiments_compare_versioned_reports(project, experiments):
    dvc = [sys.executable, "-m", "dvc"]
    # the small reports are git's: a fresh clone has the baseline's metrics
    assert {f"reports/scenes/{f}" for f in REPORTS} <= experiments["tracked"]
    # the mask change re-ran what it affects, not the shards
    assert _ran(experiments["ws_out"]) == {"pretrain@scenes", "probe@scenes"}
    # the queued probe change ran in its own copy, only the probe stage (shards and encoder from the cache)
    assert "Success" in experiments["queue_status"], experiments["queue_status"]
    assert _ran(experiments["queue_log"]) == {"probe@scenes"}, experiments["queue_log"][-3000:]

    rows = _exp_rows(_run_json(dvc + ["exp", "show", "--json"], project))
    by_name = {r["name"]: r for r in rows if r["name"]}
    assert {experiments["ws_name"], experiments["queued_name"]} <= set(by_name), [r["name"] for r in rows]
    head = _git(project, "rev-parse", "HEAD").strip()
    baseline = next(r for r in rows if r["rev"] == head)
    npred2, iter7 = by_name[experiments["ws_name"]], by_name[experiments["queued_name"]]
    assert (_npred(baseline), _npred(npred2), _npred(iter7)) == (4, 2, 4)
    for row in (baseline, npred2, iter7):  # each with its probe metrics beside its parameters
        top1 = row["metrics"]["reports/scenes/probes.json"]["probes"]["linear"]["ijepa"]
        assert 0.0 <= top1 <= 1.0
    assert npred2["metrics"]["reports/scenes/pretrain.json"]["final_loss"] != \
        baseline["metrics"]["reports/scenes/pretrain.json"]["final_loss"]

    # workspace (the npred=2 run) against the committed baseline, read from git
    diff = _run_json(dvc + ["metrics", "diff", "--all", "--json"], project)
    loss = diff["reports/scenes/pretrain.json"]["final_loss"]
    assert loss["old"] == baseline["metrics"]["reports/scenes/pretrain.json"]["final_loss"] and loss["new"] != loss["old"]
    assert diff["reports/scenes/probes.json"]["probes.linear.ijepa"]["old"] is not None
    # the loss curve and probe table of both revisions, from git (HEAD) and the workspace
    plots = _run_json(dvc + ["plots", "diff", "HEAD", "--json", "--split"], project)["data"]
    for name in ("reports/scenes/pretrain_loss.csv", "reports/scenes/probe_table.json"):
        rows = plots[name][0]["anchor_definitions"]["<DVC_METRIC_DATA>"]
        assert {r["rev"] for r in rows} == {"HEAD", "workspace"}, name


def test_probe_run_is_a_comparable_mlflow_row(project, experiments):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("scenes")
    probes = [r for r in client.search_runs([exp.experiment_id], "tags.dvc_stage = 'probe@scenes'")]
    by_exp = {r.data.tags.get("dvc_exp"): r for r in probes}
    # both experiments' probe runs are in the project's store (the queued one ran in a temporary copy)
    assert {experiments["ws_name"], experiments["queued_name"]} <= set(by_exp)
    npred2, iter7 = by_exp[experiments["ws_name"]], by_exp[experiments["queued_name"]]
    assert npred2.data.params["pretrain.masks.npred"] == "2" and iter7.data.params["pretrain.masks.npred"] == "4"
    for run in (npred2, iter7):
        p = run.data.params
        assert {"pretrain.method", "pretrain.model.preset", "pretrain.optimisation.lr", "pretrain.steps",
                "pretrain.encoder.embed_dim"} <= set(p)
        assert p["pretrain.steps"] == p["pretrain.optimisation.total_steps"]
        assert 0.0 <= run.data.metrics["probe.linear.ijepa"] <= 1.0
        # the shards as dataset input, the encoder downloadable, the pretrain run that wrote it
        inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
        assert inputs and inputs[0].dataset.name.endswith("-shards")
        manifest_sha = json.loads((project / "reports/scenes/shard.json").read_text())["manifest_sha256"]
        assert inputs[0].dataset.digest == manifest_sha[:32]
        assert {"encoder/encoder.safetensors", "encoder/encoder.json"} <= \
            {f.path for f in client.list_artifacts(run.info.run_id, "encoder")}
        pre = client.get_run(run.data.tags["input.pretrain_run_id"])
        assert pre.data.tags["output.encoder_sha256"] == run.data.tags["input.encoder_sha256"]
        assert run.info.status == "FINISHED"
    assert npred2.data.tags["dvc_exp_baseline"]


@pytest.mark.browser
def test_mlflow_compare_page_shows_the_mask_parameter_beside_probe_metrics(project, experiments, tmp_path):
    """Two tiny runs differing in one mask parameter (the baseline, npred 4, and the npred2 experiment):
    MLflow's compare page, in headless Chromium, shows both with that parameter and their probe metrics.
    IJEPA_SAVE_COMPARE_SCREENSHOT=docs/mlflow_compare.png keeps the screenshot."""
    from urllib.parse import quote

    import mlflow
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    from ui_helpers import browser_missing, chromium_driver, mlflow_server, page_text, prime_ui

    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    eid = client.get_experiment_by_name("scenes").experiment_id
    probes = client.search_runs([eid], "tags.dvc_stage = 'probe@scenes'", order_by=["attributes.start_time DESC"])
    npred2 = next(r for r in probes if r.data.tags.get("dvc_exp") == experiments["ws_name"])
    base = next(r for r in probes if "dvc_exp" not in r.data.tags)  # the newest baseline probe run
    assert (base.data.params["pretrain.masks.npred"], npred2.data.params["pretrain.masks.npred"]) == ("4", "2")
    differing = {k for k in set(base.data.params) | set(npred2.data.params) if k.startswith("pretrain.")
                 and base.data.params.get(k) != npred2.data.params.get(k)}
    assert differing == {"pretrain.masks.npred"}, differing  # one mask parameter apart
    ids = [base.info.run_id, npred2.info.run_id]
    (tmp_path / "server").mkdir()
    with mlflow_server(uri, tmp_path / "server") as url, chromium_driver(1400, 1800) as driver:
        prime_ui(driver, url, eid)  # cosmetic: the assistant panel closed
        driver.get(f"{url}/#/compare-runs?runs={quote(json.dumps(ids))}&experiments={quote(json.dumps([eid]))}")
        lines = lambda d: [ln.strip() for ln in page_text(d).splitlines()]  # noqa: E731
        try:
            WebDriverWait(driver, 45, poll_frequency=0.25).until(
                lambda d: {"pretrain.masks.npred", "probe.linear.ijepa"} <= set(lines(d)))
        except TimeoutException:
            driver.save_screenshot(str(tmp_path / "compare_timeout.png"))
            pytest.fail(f"compare page incomplete at {driver.current_url}:\n{page_text(driver)[:4000]}")
        text = page_text(driver)
        # the Parameters table: one row per key, a value per run
        row = re.search(r"^pretrain\.masks\.npred\t(\S+)\t(\S+)$", text, re.M)
        assert row and sorted(row.groups()) == ["2", "4"], text[:6000]
        # the Metrics table: the metric names, then each metric's value per run (shown to 3 decimals)
        table = [ln.strip() for ln in text.split("\nMetrics\n", 1)[-1].splitlines() if ln.strip()]
        table = table[1:] if table[0] == "Show diff only" else table
        names = list(itertools.takewhile(lambda ln: ln.startswith("probe."), table))
        # the table renders its first rows only (virtual scrolling; 30 probe metrics since the attentive
        # and kNN rows): check the linear probe's row where it is rendered, else the first probe row
        assert names, table[:80]
        metric = "probe.linear.ijepa" if "probe.linear.ijepa" in names else names[0]
        i = names.index(metric)
        shown = sorted(float(v) for v in table[len(names) + 2 * i: len(names) + 2 * i + 2])
        want = sorted(r.data.metrics[metric] for r in (base, npred2))
        assert shown == pytest.approx(want, abs=6e-4), table[:80]
        # "Show diff only" on the parameters: the one row left is the mask parameter
        driver.find_elements("xpath", "//*[normalize-space()='Show diff only']/preceding-sibling::*[1]")[0].click()

        def params_shown(d) -> list[str]:
            section = page_text(d).split("\nParameters\n", 1)[-1].split("\nMetrics\n", 1)[0]
            return [ln.split("\t")[0] for ln in section.splitlines() if "\t" in ln]

        try:
            WebDriverWait(driver, 15, poll_frequency=0.25).until(lambda d: params_shown(d) == ["pretrain.masks.npred"])
        except TimeoutException:
            pytest.fail(f"diff-only parameters: {params_shown(driver)}")
        # cosmetic, not asserted: let the parallel-coordinates plot draw before the screenshot
        with contextlib.suppress(TimeoutException):
            WebDriverWait(driver, 10, poll_frequency=0.25).until(
                lambda d: d.find_elements("css selector", ".js-plotly-plot .parcoords, .js-plotly-plot svg"))
        shot = tmp_path / "mlflow_compare.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        target = os.environ.get("IJEPA_SAVE_COMPARE_SCREENSHOT")
        if target:
            shutil.copyfile(shot, target)


def test_repro_after_kill_during_pretraining_resumes(project):
    """Kill `dvc repro` once a checkpoint exists; the next repro resumes from it."""
    # a checkpoint every 2 steps, so one exists early; 200 steps, and probes along training only
    # at every 50th checkpoint (400 steps scored at every checkpoint: 86 s for this test, now 68)
    def longer(p):
        c = p["pretrain"]["common"]
        c.update(checkpoint_every=2)
        c["optimisation"].update(total_steps=200)
        c["monitor"].update(every_checkpoints=50)

    _edit(project / "conf/base/parameters_pretrain.yml", longer)
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
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("scenes").experiment_id
    killed = [r.info.run_id for r in client.search_runs([exp_id], "attributes.status = 'RUNNING'")]
    assert killed, "the killed stage's MLflow run should still be RUNNING before the next start"
    # the same parameters: the stage runs again and continues from the newest checkpoint
    out = _run([sys.executable, "-m", "dvc", "repro", "pretrain@scenes"], project)
    assert "pretrain@scenes" in _ran(out)
    summary = json.loads((project / "data/06_models/scenes/summary.json").read_text())
    assert summary["resumed_from_step"] is not None and summary["resumed_from_step"] >= 2
    assert summary["steps"] == 200
    # ... and the killed run is no longer RUNNING: the next start marked it KILLED
    for run_id in killed:
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and "was gone" in run.data.tags["stale_reason"]
