"""dvc.yaml's deps cannot go stale: every project file a stage's Kedro pipeline loads is a dep.

For each stage of dvc.yaml that runs `kedro run --pipeline <name>`, the project files the
stage needs are computed, never listed by hand, so the check keeps working as modules move:

- dynamically: `pipelines.<name>.pipeline` and the `kedro run` path of this project
  (ijepa_kedro: settings, hooks, datasets, pipeline_registry) are imported in a fresh
  interpreter (cwd = repository root, src/ on sys.path); every loaded module whose file lies
  inside the repository (outside the interpreter's own prefix) counts;
- statically: from pipelines/<name>/*.py and src/ijepa_kedro/*.py, every `import` /
  `from ... import` (also those inside functions: nodes import lazily) is followed through
  the AST, within the project's own packages (the top-level packages under src/ and the
  repository root), including the parent packages' __init__.py.

A file is covered when it is a dep of the stage or lies under a dep folder. A failure names
the stage, the file and the import chain that reaches it.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from collections import deque
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

SRC = ROOT / "src"
KEDRO_GLUE = "ijepa_kedro"  # the project's Kedro package: `kedro run` goes through it for every stage


# ----------------------------------------------------------------------------- dvc.yaml
def _stages() -> dict[str, dict]:
    """{stage name: {"pipeline": kedro pipeline name, "deps": [...], "outs": [...]}} with every
    foreach item substituted (deps and outs of all items together)."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    kedro_vars = {}
    for v in spec.get("vars", []):
        if isinstance(v, dict):
            kedro_vars.update(v)
    out: dict[str, dict] = {}
    for name, stage in spec["stages"].items():
        bodies = []
        if "foreach" in stage:
            for item in stage["foreach"]:
                bodies.append(_substitute(stage["do"], {"item": item, **kedro_vars}))
        else:
            bodies.append(_substitute(stage, kedro_vars))
        pipeline = None
        deps: list[str] = []
        outs: list[str] = []
        for body in bodies:
            m = re.search(r"--pipeline[ =](\S+)", body.get("cmd", ""))
            if m:
                pipeline = m.group(1)
            deps += [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])]
            for key in ("outs", "metrics", "plots"):
                outs += [o if isinstance(o, str) else next(iter(o)) for o in body.get(key, [])]
        out[name] = {"pipeline": pipeline, "deps": sorted(set(deps)), "outs": sorted(set(outs))}
    return out


def _substitute(obj, values: dict):
    if isinstance(obj, str):
        return re.sub(r"\$\{(\w+)\}", lambda m: str(values.get(m.group(1), m.group(0))), obj)
    if isinstance(obj, list):
        return [_substitute(x, values) for x in obj]
    if isinstance(obj, dict):
        return {_substitute(k, values): _substitute(v, values) for k, v in obj.items()}
    return obj


KEDRO_STAGES = {name: s for name, s in _stages().items() if s["pipeline"]}


# ----------------------------------------------------------------------------- static imports
@lru_cache(maxsize=None)
def _package_dirs() -> dict[str, Path]:
    """The project's own top-level packages: folders with __init__.py under src/ and the root."""
    dirs = {}
    for base in (SRC, ROOT):
        for d in sorted(base.iterdir()):
            if (d / "__init__.py").is_file() and d.name not in dirs:
                dirs[d.name] = d
    return dirs


def _module_file(name: str) -> Path | None:
    """File of project module `name` (package -> its __init__.py), or None if not a project module."""
    head, *rest = name.split(".")
    base = _package_dirs().get(head)
    if base is None:
        return None
    path = base.joinpath(*rest)
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _module_name(path: Path) -> str:
    for name, base in _package_dirs().items():
        if path.is_relative_to(base):
            parts = [name, *path.relative_to(base).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(f"{path} is not in a project package")


def _imported_names(path: Path) -> set[str]:
    """Absolute module names imported anywhere in `path` (function bodies included); for
    `from X import Y` both X and X.Y (Y may be a submodule). Also modules named by a string
    literal in ``importlib.import_module("X")`` or run as a child process (``"-m", "X"`` in an
    argument list, as torchrun launches do)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    try:
        this = _module_name(path)
    except ValueError:  # a script outside the packages: no relative imports
        this = path.stem
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module" \
                and isinstance(node.args[0].value, str):
            names.add(node.args[0].value)
        elif isinstance(node, (ast.List, ast.Tuple)):
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            names.update(b for a, b in zip(items, items[1:]) if a == "-m" and isinstance(b, str))
    return names


def _files_of(name: str) -> list[Path]:
    """The files importing `name` executes: every parent package's __init__.py, then the module."""
    parts = name.split(".")
    files = []
    for i in range(1, len(parts) + 1):
        f = _module_file(".".join(parts[:i]))
        if f is not None:
            files.append(f)
    return files


def _static_closure(roots: list[Path]) -> dict[Path, Path | None]:
    """{file: a file that imports it (None for a root)} over the project's packages."""
    seen: dict[Path, Path | None] = {r: None for r in roots}
    todo = deque(roots)  # breadth first: the chain a failure names is a shortest one
    while todo:
        f = todo.popleft()
        for name in sorted(_imported_names(f)):
            for g in _files_of(name):
                if g not in seen:
                    seen[g] = f
                    todo.append(g)
    return seen


# ----------------------------------------------------------------------------- dynamic imports
_PROBE = r"""
import importlib, json, os, sys
root, src, pipeline = sys.argv[1:4]
sys.path[:0] = [src, root]
mod = importlib.import_module(f"pipelines.{pipeline}.pipeline")
mod.create_pipeline()
for name in ("settings", "hooks", "datasets", "pipeline_registry"):
    importlib.import_module(f"%s.{name}")
prefixes = {os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
files = set()
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None)
    if not f or not os.path.isabs(f):  # torch._ops / torch._classes report bare names
        continue
    f = os.path.realpath(f)
    if f.startswith(os.path.realpath(root) + os.sep) and not any(f.startswith(p) for p in prefixes):
        files.add(os.path.relpath(f, root))
print(json.dumps(sorted(files)))
""" % KEDRO_GLUE


@lru_cache(maxsize=None)
def _loaded_files(pipeline: str) -> tuple[str, ...]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT), str(SRC), pipeline], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
                               "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, f"importing pipelines.{pipeline}.pipeline failed:\n{proc.stderr[-4000:]}"
    return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))


# ----------------------------------------------------------------------------- the checks
def _needed(pipeline: str) -> dict[str, str]:
    """{repo-relative file: why it is needed} for a stage running `pipeline`."""
    roots = sorted((ROOT / "pipelines" / pipeline).glob("*.py")) + sorted((SRC / KEDRO_GLUE).glob("*.py"))
    closure = _static_closure(roots)
    rel = lambda p: p.relative_to(ROOT).as_posix()  # noqa: E731
    why: dict[str, str] = {}
    for f, parent in closure.items():
        chain = [rel(f)]
        while parent is not None:
            chain.append(rel(parent))
            parent = closure[parent]
        why[rel(f)] = "imported via " + " <- ".join(chain[1:]) if len(chain) > 1 else "a root of the stage"
    for f in _loaded_files(pipeline):
        why.setdefault(Path(f).as_posix(), f"loaded when pipelines.{pipeline}.pipeline and {KEDRO_GLUE} are imported")
    return why


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d.rstrip("/") or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_dvc_yaml_has_kedro_stages():
    assert {"shard", "pretrain", "probe"} <= set(KEDRO_STAGES), sorted(KEDRO_STAGES)


@pytest.mark.parametrize("stage", sorted(KEDRO_STAGES))
def test_stage_depends_on_every_project_file_it_loads(stage):
    spec = KEDRO_STAGES[stage]
    needed = _needed(spec["pipeline"])
    missing = {f: why for f, why in needed.items() if not _covered(f, spec["deps"])}
    assert not missing, (f"dvc.yaml stage {stage!r} (kedro pipeline {spec['pipeline']!r}) does not depend on:\n"
                         + "\n".join(f"  {f}  ({why})" for f, why in sorted(missing.items()))
                         + "\nadd the file, or a folder above it, to the stage's deps")


@pytest.mark.parametrize("stage", sorted(KEDRO_STAGES))
def test_stage_covers_the_kedro_run_path(stage):
    # `kedro run` reads settings, hooks, the catalog's datasets and the registry for every stage.
    deps = KEDRO_STAGES[stage]["deps"]
    for name in ("settings", "hooks", "datasets", "pipeline_registry"):
        f = f"src/{KEDRO_GLUE}/{name}.py"
        assert _covered(f, deps), f"dvc.yaml stage {stage!r} does not depend on {f} (the kedro run path)"


def test_every_source_dep_exists():
    # A dep that is not another stage's output must be in the repository, or `dvc repro` fails
    # with a missing dependency (e.g. after a module moved).
    outs = {o for s in _stages().values() for o in s["outs"]}
    missing = [(name, d) for name, s in _stages().items() for d in s["deps"]
               if not _covered(d, sorted(outs)) and not (ROOT / d).exists()]
    assert not missing, "dvc.yaml deps that do not exist: " + ", ".join(f"{d} (stage {n})" for n, d in missing)


def test_the_static_walk_follows_lazy_and_relative_imports(tmp_path):
    # pipelines/probe/pipeline.py imports .nodes (relative); the nodes import ijepa.probes,
    # which imports ijepa.export at module level: all three must be found.
    closure = _static_closure([ROOT / "pipelines/probe/pipeline.py"])
    rel = {p.relative_to(ROOT).as_posix() for p in closure}
    assert {"pipelines/probe/nodes.py", "src/ijepa/probes.py", "src/ijepa/export.py",
            "src/ijepa/__init__.py", "pipelines/__init__.py"} <= rel
    # and imports inside functions count (ijepa_kedro.datasets imports ijepa.data.reader lazily)
    lazy = {p.relative_to(ROOT).as_posix() for p in _static_closure([SRC / KEDRO_GLUE / "datasets.py"])}
    assert "src/ijepa/data/reader.py" in lazy


def test_the_static_walk_follows_import_module_and_child_processes(tmp_path):
    f = tmp_path / "script.py"
    f.write_text("import importlib, subprocess, sys\n"
                 "def run():\n"
                 "    importlib.import_module('ijepa.linear')\n"
                 "    subprocess.run([sys.executable, '-m', 'ijepa.schedules'])\n")
    rel = {p.relative_to(ROOT).as_posix() for p in _static_closure([f]) if p != f}
    assert {"src/ijepa/linear.py", "src/ijepa/schedules.py"} <= rel
