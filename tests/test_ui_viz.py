"""`make viz`: kedro-viz on 127.0.0.1 shows the project's pipelines in headless Chromium.

The server is started as the Makefile starts it (`kedro viz run --host 127.0.0.1 --no-browser`) on
a free port, on this repository; for each of the shard, pretrain and probe pipelines the page
selected by its id (`?pid=`) shows that pipeline and its nodes, and not the others' nodes.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.support.ui import WebDriverWait

from ui_helpers import browser_missing, chromium_driver, page_text, served

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.browser, pytest.mark.slow]

# pipeline -> (nodes it shows, a node of another pipeline it must not show)
PIPELINES = {"shard": ({"shard", "shard_summary"}, "plan_pretraining"),
             "pretrain": ({"plan_pretraining", "mask_preview", "pretrain", "pretrain_summary"}, "probe_table"),
             "probe": ({"probe", "probe_table", "feature_cache"}, "plan_pretraining")}


@pytest.fixture
def viz(tmp_path: Path):
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("kedro_viz", reason="kedro-viz not installed: pip install -r requirements-ui.txt")
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": str(ROOT / "src")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # the command `make viz` runs; a port taken between finding and binding it is retried
    command = lambda port: ["kedro", "viz", "run", "--host", "127.0.0.1", "--port", str(port),  # noqa: E731
                            "--no-browser"]
    # kedro-viz refuses ports above 49151 (kedro_viz.launchers.utils._find_available_port), and the
    # OS hands out free ports up to 60999 here: draw below its limit
    with served(command, "/api/main", tmp_path / "viz.log", name="kedro viz", cwd=ROOT, env=env,
                ready_timeout=120, port_range=(20000, 49151)) as base:
        yield base


def test_kedro_viz_shows_the_shard_pretrain_and_probe_pipelines(viz, tmp_path):
    with chromium_driver(1400, 900) as driver:
        for pid, (nodes, other) in PIPELINES.items():
            driver.get(f"{viz}/?pid={pid}")
            words = lambda d: set(re.split(r"\s+", page_text(d)))  # noqa: E731
            try:
                WebDriverWait(driver, 30, poll_frequency=0.25).until(lambda d: {pid, *nodes} <= words(d))
            except TimeoutException:
                driver.save_screenshot(str(tmp_path / f"viz_{pid}.png"))
                pytest.fail(f"kedro-viz pipeline {pid}: {sorted({pid, *nodes} - words(driver))} not shown\n"
                            f"{page_text(driver)[:3000]}")
            assert other not in words(driver), (pid, other)
