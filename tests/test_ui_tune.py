"""`make tune-ui`: optuna-dashboard on 127.0.0.1 shows a mask-ratio study in headless Chromium.

The server runs the command the Makefile runs (read from `make -n tune-ui`, with the storage and
port overridden) on a tiny sqlite study whose trials are drawn by the tuner's own search space
(`ijepa.tune.space.suggest`); the study list shows the study, and the study page its trials'
parameters and best value.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.support.ui import WebDriverWait

from ui_helpers import browser_missing, chromium_driver, page_text, served

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.browser, pytest.mark.slow]
STUDY = "ijepa-masks-fashion_mnist"


def _study(storage: str) -> float:
    """Four complete trials of the tuner's search space; returns the best value."""
    import optuna

    from ijepa.tune.config import SearchSpace
    from ijepa.tune.space import suggest

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    space = SearchSpace()
    study.optimize(lambda t: 0.6 + 0.02 * suggest(t, space)["npred"] + 0.1 * t.params["pred_scale_min"],
                   n_trials=4)
    return study.best_value


def _tune_ui_command(storage: str, port: int) -> list[str]:
    """What `make tune-ui` runs, for this storage and port (the set-up prerequisites are up to
    date here or printed as other lines: only the optuna-dashboard line is taken)."""
    venv = Path(sys.executable).parent.parent
    out = subprocess.run(["make", "-s", "-n", "tune-ui", f"VENV={venv}", f"TUNE_STORAGE={storage}",
                          f"TUNE_UI_PORT={port}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in out.splitlines() if ln.strip().startswith("optuna-dashboard")]
    assert len(lines) == 1, f"make -n tune-ui printed no single optuna-dashboard command:\n{out}"
    cmd = shlex.split(lines[0])
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1", cmd  # never on every interface
    return cmd


def test_optuna_dashboard_shows_the_study(tmp_path):
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard not installed: pip install -r requirements-ui.txt")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    best = _study(storage)
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    with served(lambda port: _tune_ui_command(storage, port), "/api/studies", tmp_path / "dashboard.log",
                name="optuna-dashboard", cwd=tmp_path, env=env, ready_timeout=60) as base:
        with chromium_driver(1400, 1000) as driver:
            driver.get(f"{base}/dashboard")
            try:
                WebDriverWait(driver, 30, poll_frequency=0.25).until(lambda d: STUDY in page_text(d))
            except TimeoutException:
                pytest.fail(f"study list does not show {STUDY}:\n{page_text(driver)[:2000]}")
            driver.get(f"{base}/dashboard/studies/1")
            wanted = ("npred", "pred_scale_min", f"{best:.4f}"[:5])
            try:
                WebDriverWait(driver, 30, poll_frequency=0.25).until(
                    lambda d: all(w in page_text(d) for w in wanted))
            except TimeoutException:
                driver.save_screenshot(str(tmp_path / "dashboard.png"))
                pytest.fail(f"study page lacks {[w for w in wanted if w not in page_text(driver)]}:\n"
                            f"{page_text(driver)[:3000]}")
