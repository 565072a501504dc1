"""Security defaults stay: every server the project starts listens on 127.0.0.1 unless the
user asks otherwise, and weights are read with `torch.load(weights_only=True)` or safetensors
(no pickled code runs from a checkpoint or an imported file)."""
from __future__ import annotations

import ast
import os
import re

import pytest
import torch
import yaml

from conftest import ROOT

CODE_DIRS = ("src", "pipelines", "benchmarks")


def _calls(name: str):
    """(file, line, ast.Call) of every call `<x>.<name>(...)` / `<name>(...)` in the project code."""
    for d in CODE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call):
                    f = node.func
                    called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
                    if called == name:
                        yield path.relative_to(ROOT), node.lineno, node


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    bad = []
    for path, line, call in _calls("load"):
        base = call.func.value if isinstance(call.func, ast.Attribute) else None
        if isinstance(base, ast.Name) and base.id == "torch":
            kw = {k.arg: k.value for k in call.keywords}
            value = kw.get("weights_only")
            # True, or `not trust_pickle` (ijepa import --trust-pickle: an explicit, logged opt-in)
            ok = (isinstance(value, ast.Constant) and value.value is True) or (
                isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.Not)
                and isinstance(value.operand, ast.Name) and value.operand.id == "trust_pickle")
            if not ok:
                bad.append(f"{path}:{line}")
        if isinstance(base, ast.Name) and base.id in ("pickle", "dill", "joblib", "cloudpickle"):
            bad.append(f"{path}:{line} ({base.id}.load)")
    for path, line, call in _calls("loads"):
        if "pickle" in ast.unparse(call.func):
            bad.append(f"{path}:{line} ({ast.unparse(call.func)})")
    assert not bad, f"torch.load without weights_only=True, or unpickling: {bad}"


class _Payload:
    """A pickle that would create a file when unpickled with weights_only=False."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_with_pickled_code_is_refused_and_never_runs(tmp_path):
    from ijepa import checkpoint as ckpt

    d = tmp_path / "checkpoints"
    ckpt.save_checkpoint({"step": 4}, d, step=4)
    marker = tmp_path / "pwned"
    torch.save({"format": ckpt.FORMAT, "step": 8, "x": _Payload(str(marker))}, d / "ckpt-00000008.pt")
    with pytest.raises(ckpt.CheckpointError, match="ckpt-00000008.pt"):
        ckpt.load_checkpoint(d / "ckpt-00000008.pt")
    path, state = ckpt.load_latest(d)  # the newer, hostile file is skipped for the good one
    assert state["step"] == 4 and not marker.exists()


def test_exported_encoders_are_safetensors(tmp_path):
    from conftest import tiny_encoder_config
    from ijepa.export import load_encoder, save_encoder
    from ijepa.models import ViTEncoder

    out = save_encoder(ViTEncoder(tiny_encoder_config()), tmp_path / "enc").parent
    assert {p.suffix for p in out.iterdir()} <= {".safetensors", ".json"}
    load_encoder(out)


def test_servers_bind_loopback_by_default():
    make = (ROOT / "Makefile").read_text()
    ui = [line for line in make.splitlines() if re.search(r"\bmlflow (ui|server)\b", line)]
    assert ui and all("--host 127.0.0.1" in line for line in ui), ui
    # make viz (kedro-viz) and make tune-ui (optuna-dashboard)
    for server in (r"\bkedro viz run\b", r"^\s*optuna-dashboard\b"):
        lines = [line for line in make.splitlines() if re.search(server, line)]
        assert lines and all("--host 127.0.0.1" in line for line in lines), (server, lines)
    mlflow_conf = yaml.safe_load((ROOT / "conf/base/mlflow.yml").read_text())
    assert mlflow_conf["ui"]["host"] == "127.0.0.1"
    # the servers the tests start, and the README commands that start one
    for rel in ("tests/services.py", "tests/ui_helpers.py"):
        text = (ROOT / rel).read_text()
        assert "0.0.0.0" not in text.replace("--host 0.0.0.0 and configure", "") and "127.0.0.1" in text, rel
    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")  # join continued command lines
    commands = [line for line in readme.splitlines() if re.search(r"^\s*(mlflow (server|ui)\b|.*pg_ctl .* start)", line)]
    assert commands
    for line in commands:
        assert "--host 127.0.0.1" in line or "listen_addresses=127.0.0.1" in line, line
    # torchrun --standalone: its rendezvous stays on the machine
    from ijepa.trainer.launch import torchrun_command

    assert "--standalone" in torchrun_command(ROOT / "c.json", "s", "o", 2)


@pytest.mark.slow
def test_test_postgres_listens_on_loopback_only(postgres):
    import psycopg2

    with psycopg2.connect(host=postgres["host"], port=postgres["port"], user=postgres["user"],
                          password=postgres["password"], dbname="postgres") as conn, conn.cursor() as cur:
        cur.execute("SHOW listen_addresses")
        assert cur.fetchone()[0] == "127.0.0.1"
        cur.execute("SHOW password_encryption")
        assert cur.fetchone()[0] == "scram-sha-256"
    pid = int((postgres["data"] / "postmaster.pid").read_text().split()[0])
    assert os.stat(f"/proc/{pid}").st_uid != 0  # the server runs as `postgres` (runuser), never as root
