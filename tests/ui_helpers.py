"""Helpers for the real-browser MLflow UI check (tests/test_mlflow_ui.py).

`fill_store` writes a tiny run set shaped like the pipeline's (one experiment per dataset,
one run per DVC stage, lineage tags from ijepa_kedro.hooks.LineageHooks). It is a plain
function of a tracking URI so it can later be swapped for a real tiny pipeline run.

`mlflow_server` starts `mlflow server` on a free loopback port against a sqlite store and
always stops it again; `chromium_driver` opens headless Chromium with the flags that keep
it off the network.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

EXPERIMENT = "scenes"
PROBE_METRIC = "probe.linear.ijepa"  # as the probe pipeline names it
PROBE_VALUE = 0.731
PRETRAIN_LOSS = [1.92, 1.41, 1.07, 0.88, 0.79]
FAKE_COMMIT = "61a3310c0ffee0000000000000000000deadbeef"


def fill_store(tracking_uri: str) -> dict:
    """Fill the MLflow store at `tracking_uri` with experiment "scenes" and its three stage runs.

    Returns {"experiment_id": str, "runs": {run_name: run_id}, "metric": (name, value)}.
    Uses an explicit MlflowClient, so no global MLflow state (active run, tracking URI) leaks.
    """
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment(EXPERIMENT)

    def lineage(stage: str) -> list[RunTag]:
        tags = {
            "git_commit": FAKE_COMMIT,
            "git_dirty": "false",
            "kedro_pipeline": stage,
            "dataset": EXPERIMENT,
            "dvc_stage": f"{stage}@{EXPERIMENT}",
        }
        return [RunTag(k, v) for k, v in tags.items()]

    stages = {
        "shard": (
            {"shard.scenes.scenes.sizes.train": "512", "shard.scenes.image_size": "32", "shard.common.seed": "0"},
            {"shard.samples_total": [768.0]},
        ),
        "pretrain": (
            {"pretrain.common.optimisation.total_steps": "250", "pretrain.common.optimisation.lr": "0.001",
             "pretrain.common.masks.npred": "4", "pretrain.common.model.preset": "tiny"},
            {"loss": PRETRAIN_LOSS},
        ),
        "probe": (
            {"probe.common.solver": "lbfgs", "probe.common.max_iter": "100"},
            {PROBE_METRIC: [PROBE_VALUE], "probe.linear.pixels": [0.412]},
        ),
    }

    runs: dict[str, str] = {}
    t0 = int(time.time() * 1000)
    for i, (stage, (params, metrics)) in enumerate(stages.items()):
        run = client.create_run(experiment_id, start_time=t0 + 1000 * i, tags={}, run_name=stage)
        rid = run.info.run_id
        batch = [Metric(key, float(v), t0 + 1000 * i + step, step)
                 for key, history in metrics.items() for step, v in enumerate(history)]
        client.log_batch(rid, metrics=batch,
                         params=[Param(k, v) for k, v in params.items()], tags=lineage(stage))
        client.set_terminated(rid, "FINISHED", end_time=t0 + 1000 * i + 900)
        runs[stage] = rid
    return {"experiment_id": experiment_id, "runs": runs, "metric": (PROBE_METRIC, PROBE_VALUE)}


def free_port(port_range: tuple[int, int] | None = None) -> int:
    """A 127.0.0.1 port free now: the OS's choice, or a random one of `port_range` (inclusive)."""
    if port_range is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(*port_range)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free 127.0.0.1 port in {port_range[0]}-{port_range[1]} after 200 tries")


class ServerExited(RuntimeError):
    """A server died before it became ready (e.g. its port was taken meanwhile)."""


def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers 200, the process dies, or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerExited(f"the server exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
                last = r.status
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            last = e
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s (last: {last!r})")


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the server's process group (uvicorn spawns workers), then SIGKILL, bounded."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    # Whatever of the group outlived its leader (a stray worker) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def served(command: Callable[[int], list[str]], ready_path: str, log_path: Path, *, name: str,
           cwd: Path | None = None, env: dict[str, str] | None = None, ready_timeout: float = 45.0,
           attempts: int = 3, port_range: tuple[int, int] | None = None) -> Iterator[str]:
    """Run a local web server (`command(port)`) on a free 127.0.0.1 port until `ready_path`
    answers 200; yield its base URL; always stop it (its whole process group).

    The free port is found by binding port 0 and closing it, so another process can grab it
    before the server binds: an early exit is retried on a new port (`attempts` times).
    `port_range`: draw the port from this range (for servers that refuse some ports).
    """
    for attempt in range(1, attempts + 1):
        port = free_port(port_range)
        with open(log_path, "wb") as log:
            # Own session: teardown signals the whole group (e.g. uvicorn parent + worker).
            proc = subprocess.Popen(command(port), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_http_ok(f"{base}{ready_path}", ready_timeout, proc)
            except Exception as e:
                tail = log_path.read_text(errors="replace")[-3000:]
                if isinstance(e, ServerExited) and attempt < attempts:
                    continue  # the finally below reaps it; try another port
                raise RuntimeError(f"{name}: {e}\n--- {name} log ({log_path}) ---\n{tail}") from e
            yield base
            return
        finally:
            _stop(proc)


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, workdir: Path, ready_timeout: float = 45.0,
                  attempts: int = 3) -> Iterator[str]:
    """Run `mlflow server` against `backend_store_uri` (see `served`); yield its base URL."""
    env = {**os.environ, "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
                "--default-artifact-root", (workdir / "artifacts").as_uri(),
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]

    with served(command, "/health", workdir / "mlflow_server.log", name="mlflow server", cwd=workdir, env=env,
                ready_timeout=ready_timeout, attempts=attempts) as base:
        yield base


def browser_missing() -> str | None:
    """A skip reason when headless Chromium or chromedriver is not installed, else None."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        return f"{' and '.join(missing)} not found: run .ci/install_browser.sh"
    return None


@contextlib.contextmanager
def chromium_driver(width: int = 1400, height: int = 900) -> Iterator["object"]:
    """Headless Chromium via selenium with a fresh profile and no background networking."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ijepa-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                 f"--window-size={width},{height}"):
        opts.add_argument(flag)
    # Never let selenium-manager try to download a driver: use Debian's.
    service = Service(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=opts)
    try:
        driver.set_page_load_timeout(30)
        driver.set_window_size(width, height)
        yield driver
    finally:
        with contextlib.suppress(Exception):
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# --- MLflow UI (3.x) specifics -------------------------------------------------------------
# MLflow 3 opens an experiment in the "GenAI" workflow (traces overview) unless the URL or
# localStorage picks "Model training"; `?workflowType=machine_learning` on the runs route is
# what the sidebar toggle itself navigates to. Everything below that touches localStorage is
# cosmetic (which columns the screenshot shows, assistant panel closed): assertions never
# depend on it, so a changed key name only makes the screenshot plainer.

def experiment_runs_url(base: str, experiment_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def page_text(driver) -> str:
    """Rendered text of the whole page (innerText: no stale-element races during re-renders)."""
    return driver.execute_script("return document.body ? document.body.innerText : ''") or ""


def prime_ui(driver, base: str, experiment_id: str, widths: dict[str, int] | None = None) -> None:
    """Best effort: show lineage/metric columns in the runs table and keep the assistant closed."""
    import json

    driver.get(f"{base}/health")  # any page on the origin, so localStorage is the UI's
    # Column ids as the runs grid names them (its header cells' col-id); widths only apply
    # together with an explicit columnOrder.
    widths = widths or {"params.`pretrain.common.masks.npred`": 150, "metrics.`probe.linear.ijepa`": 140,
                        "metrics.`loss`": 80, "tags.`dvc_stage`": 150, "tags.`git_commit`": 120}
    state = {"selectedColumns": list(widths), "columnOrder": list(widths), "columnWidths": widths}
    items = {
        "mlflow.assistant.panelOpen_v1": "false",
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
        f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState': json.dumps(state),
    }
    with contextlib.suppress(Exception):
        driver.execute_script(
            "for (const [k, v] of Object.entries(arguments[0])) window.localStorage.setItem(k, v);",
            items)
