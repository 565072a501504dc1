"""Real-browser check of the MLflow UI: headless Chromium shows our experiment, runs and metric.

Needs Debian's chromium + chromium-driver (`.ci/install_browser.sh`, which CI runs first).
Set IJEPA_SAVE_UI_SCREENSHOT=docs/mlflow_ui.png to keep the experiment-page screenshot.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.support.ui import WebDriverWait

from ui_helpers import (EXPERIMENT, browser_missing, chromium_driver, experiment_runs_url,
                        fill_store, mlflow_server, page_text, prime_ui, run_url)

pytestmark = pytest.mark.browser

STAGES = ("shard", "pretrain", "probe")
UI_TIMEOUT = 30  # seconds for the single-page app to fetch and render (bounded polls, not sleeps)


@pytest.fixture
def ui_store(tmp_path: Path) -> dict:
    """A fresh sqlite MLflow store in tmp_path filled with our tiny run set."""
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    info = fill_store(tracking_uri)
    return {**info, "tracking_uri": tracking_uri}


@pytest.fixture
def mlflow_ui(ui_store: dict, tmp_path: Path):
    """`mlflow server` on a free loopback port against ui_store; stopped (bounded) at teardown."""
    workdir = tmp_path / "server"
    workdir.mkdir()
    with mlflow_server(ui_store["tracking_uri"], workdir) as base:
        yield base


@pytest.fixture
def browser():
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    with chromium_driver(1400, 900) as driver:
        yield driver


def _tokens(driver) -> set[str]:
    """Whitespace-separated words of the rendered page: grid cells and labels are separate
    words, so "shard" matches the run name, not "shard@scenes" in the dvc_stage column."""
    return set(re.split(r"\s+", page_text(driver)))


def _wait_for(driver, needles: list[str], what: str, tmp_path: Path, name: str) -> set[str]:
    """Wait (bounded) until every needle is a word on the page; on timeout fail with evidence."""
    try:
        WebDriverWait(driver, UI_TIMEOUT, poll_frequency=0.25).until(
            lambda d: set(needles) <= _tokens(d))
    except TimeoutException:
        driver.save_screenshot(str(tmp_path / f"{name}_timeout.png"))
        text = page_text(driver)
        missing = sorted(set(needles) - _tokens(driver))
        pytest.fail(f"{what}: {missing} not shown within {UI_TIMEOUT}s at {driver.current_url}\n"
                    f"screenshot: {tmp_path / f'{name}_timeout.png'}\npage text:\n{text[:3000]}")
    return _tokens(driver)


def test_mlflow_ui_shows_stage_runs_and_probe_metric(browser, ui_store, mlflow_ui, tmp_path):
    # `browser` first: a missing Chromium skips before the store and server are set up.
    eid = ui_store["experiment_id"]
    metric, value = ui_store["metric"]

    # Experiment page, "Model training" view: the runs table lists the three stage runs.
    prime_ui(browser, mlflow_ui, eid)
    browser.get(experiment_runs_url(mlflow_ui, eid))
    words = _wait_for(browser, [EXPERIMENT, *STAGES], "experiment page", tmp_path, "experiment")
    assert {EXPERIMENT, *STAGES} <= words
    # Cosmetic, not asserted: give the metric columns primed by prime_ui a moment to render
    # so the screenshot shows them (bounded; falls through if that localStorage key changed).
    try:
        WebDriverWait(browser, 5, poll_frequency=0.25).until(lambda d: f"{value}" in _tokens(d))
    except TimeoutException:
        pass
    shot = tmp_path / "mlflow_ui.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    target = os.environ.get("IJEPA_SAVE_UI_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)

    # Run page of the probe stage: the metric, its value and the lineage tag are shown.
    probe_id = ui_store["runs"]["probe"]
    browser.get(run_url(mlflow_ui, eid, probe_id))
    words = _wait_for(browser, ["probe", metric, f"{value}", "probe@scenes"], "probe run page",
                      tmp_path, "probe_run")
    assert {metric, f"{value}"} <= words
    browser.save_screenshot(str(tmp_path / "probe_run.png"))
