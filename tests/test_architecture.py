"""The library's shape: no import cycle inside `ijepa`, small modules, no Kedro, and a new
pretraining method is one new module plus a registry entry."""
from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ijepa.config import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """`ijepa` modules imported anywhere in the file (functions too), except under
    `if TYPE_CHECKING:`; `from pkg import name` counts as pkg.name when that is a module."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m == "ijepa" or m.startswith("ijepa.")}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (SRC / "ijepa").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = {m for m in _imports(path) if m in files}
        # importing a.b.c also runs a/__init__ and a/b/__init__
        deps |= {".".join(m.split(".")[:i]) for m in deps for i in range(1, m.count(".") + 1)}
        graph[name] = {d for d in deps if d in files and d != name and not name.startswith(d + ".")}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle_inside_the_library():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_modules_are_small():
    long = {str(p.relative_to(SRC)): n for p in (SRC / "ijepa").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_library_never_imports_kedro():
    users = [str(p.relative_to(SRC)) for p in (SRC / "ijepa").rglob("*.py")
             if any(m == "kedro" or m.startswith("kedro.") or m.startswith("kedro_")
                    for m in _all_imports(p))]
    assert not users


def _all_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


TOY_METHOD = '''
"""A toy objective: the pooled encoder output of the visible patches should be 1."""
import contextlib

import torch

from ijepa.methods.base import Method
from ijepa.methods.mae import RandomMaskGenerator
from ijepa.models import ViTEncoder


class Toy(Method):
    name = "toy"
    title = "Toy"
    steps_after = 0

    @classmethod
    def make_masker(cls, cfg, model):
        return RandomMaskGenerator(0.5, model.encoder.grid)

    def __init__(self, cfg, model, masker, device):
        super().__init__(cfg, model, masker, device)
        self.encoder = ViTEncoder(model.encoder).to(device)
        self.trained = self.encoder

    def loss(self, module, images, masks, autocast):
        with autocast:
            z = module(images, keep=masks.context[0])
        return ((z.float().mean(dim=(1, 2)) - 1.0) ** 2).mean(), z

    def after_step(self, momentum):
        type(self).steps_after += 1

    def checkpoint_modules(self):
        return {"encoder": self.encoder}

    def export_encoder(self):
        return self.encoder
'''


def test_a_new_method_is_one_module_and_a_registry_entry(tmp_path, monkeypatch):
    from ijepa import methods
    from ijepa.export import load_encoder
    from ijepa.trainer import run_pretraining
    from conftest import make_shards, tiny_config

    (tmp_path / "toy_method.py").write_text(textwrap.dedent(TOY_METHOD))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_method", raising=False)
    import toy_method

    with pytest.raises(ConfigError, match=r"unknown method 'toy'"):
        run_pretraining(tiny_config(method="toy"), tmp_path / "nowhere", tmp_path / "run")
    monkeypatch.setitem(methods.METHODS, "toy", toy_method.Toy)
    shards = make_shards(tmp_path / "shards", n=32, size=16, channels=1)
    cfg = tiny_config(method="toy", optimisation={"total_steps": 2, "warmup_steps": 1}, log_every=1)
    summary = run_pretraining(cfg, shards, tmp_path / "run")
    assert summary["steps"] == 2 and summary["method"] == "toy" and toy_method.Toy.steps_after == 2
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    state = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)
    assert set(state) >= {"encoder", "optimizer"} and "target_encoder" not in state
    enc = load_encoder(summary["encoder_dir"])
    torch.testing.assert_close(enc.state_dict()["patch_embed.proj.weight"], state["encoder"]["patch_embed.proj.weight"])
    # its options are checked like any method's: this one takes none
    with pytest.raises(ConfigError, match=r"method 'toy' takes no options"):
        run_pretraining({**cfg, "method_options": {"x": 1}}, shards, tmp_path / "run2")
