"""Screenshot the MLflow UI of a real store (the README's picture).

    python docs/capture_ui.py [--store mlflow.db] [--experiment fashion_mnist] [--out docs/mlflow_ui.png]

Starts `mlflow server` on a free loopback port against the store, opens the experiment's
runs page in headless Chromium (Debian chromium + chromium-driver: .ci/install_browser.sh)
with the lineage and probe columns shown, and saves the PNG. Reuses the browser check's
helpers (tests/ui_helpers.py).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ui_helpers import browser_missing, chromium_driver, experiment_runs_url, mlflow_server, page_text, prime_ui  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", default=str(ROOT / "mlflow.db"))
    p.add_argument("--experiment", default="fashion_mnist")
    p.add_argument("--out", default=str(ROOT / "docs" / "mlflow_ui.png"))
    args = p.parse_args(argv)
    reason = browser_missing()
    if reason:
        raise SystemExit(reason)
    store = Path(args.store).resolve()
    if not store.is_file():
        raise SystemExit(f"no MLflow store at {store}: run `make run` first")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{store}"
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(args.experiment)
    if exp is None:
        raise SystemExit(f"{store} has no experiment {args.experiment!r}")
    widths = {"metrics.`probe.linear.ijepa`": 140, "metrics.`probe.linear.random_init`": 170,
              "metrics.`loss`": 80, "tags.`dvc_stage`": 170, "tags.`output.encoder_sha256`": 170,
              "tags.`git_commit`": 120}
    with tempfile.TemporaryDirectory() as work, mlflow_server(uri, Path(work)) as base:
        with chromium_driver(1500, 700) as driver:
            prime_ui(driver, base, exp.experiment_id, widths)
            driver.get(experiment_runs_url(base, exp.experiment_id))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and "probe" not in page_text(driver).split():
                time.sleep(0.25)  # the single-page app renders asynchronously
            time.sleep(2)  # let the metric columns fill in (cosmetic)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(args.out)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
