"""The Makefile's set-up step (the README's `make run` / `make test` start with it)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_setup_refuses_a_fresh_venv_without_disk_space_and_says_how_much(tmp_path):
    venv = tmp_path / "venv"
    proc = subprocess.run(["make", "--no-print-directory", f"VENV={venv}", "MIN_FREE_GB=1000000",
                           f"{venv}/.installed"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "GB free under" in proc.stderr and "needs about 1000000 GB" in proc.stderr
    assert "MIN_FREE_GB=0" in proc.stderr  # the way out is named
    assert not venv.exists()  # refused before python -m venv or pip ran
