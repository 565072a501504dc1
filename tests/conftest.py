"""Helpers shared by several test files (plain functions and constants: `from conftest import ...`).

- `copy_project(dest)`: the project's files as a fresh clone has them, to run kedro / dvc in.
- `tiny_config(**over)`: a pretraining config small enough for CPU tests (fp32, deterministic).
- `make_shards(root, n, size, channels)`: a shard folder with a train split: grey blob images
  written with webdataset's TarWriter and a manifest in the data library's format
  (channels=1), or the project's own writer on procedural scenes (channels=3).
"""
from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the repository
BENCHMARKS = ROOT / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_project(dest: Path, skip: tuple[str, ...] = ("data/", "benchmarks/", "docs/", "tests/")) -> Path:
    """The project's files as a fresh clone would have them (git-tracked, plus new files git does
    not ignore), without the folders in `skip`, copied to `dest`: a project to run kedro / dvc in."""
    import shutil
    import subprocess

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file() and not rel.startswith(skip):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def scene_splits(out: Path) -> Path:
    """16-px scenes shards with train / val / test splits (48 / 24 / 8) and every label."""
    from ijepa.data import shard_dataset

    shard_dataset({"source": "scenes", "image_size": 16, "scenes": {"sizes": {"train": 48, "val": 24, "test": 8}}},
                  out, progress=False)
    return out


def tiny_encoder_config(**over):
    """A ViT small enough for CPU unit tests: 16x16 grey, 4-pixel patches, width 32, 2 blocks,
    2 heads; keyword arguments override fields (e.g. in_chans=3, img_size=8)."""
    from ijepa.models import EncoderConfig

    fields = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    return EncoderConfig(**{**fields, **over})


# ----------------------------------------------------------------------------- pretraining
TINY_MODEL = {"preset": "tiny", "patch_size": 4,
              "encoder": {"embed_dim": 32, "depth": 2, "num_heads": 2},
              "predictor": {"embed_dim": 16, "depth": 1, "num_heads": 2}}
TINY_MASKS = {"npred": 2, "pred_scale": [0.15, 0.25], "pred_aspect": [0.75, 1.5], "nenc": 1,
              "enc_scale": [0.85, 1.0], "enc_aspect": [1.0, 1.0], "min_keep": 3}


def tiny_config(**over) -> dict:
    cfg = {"model": TINY_MODEL, "masks": TINY_MASKS,
           "optimisation": {"batch_size": 8, "total_steps": 12, "warmup_steps": 2, "lr": 1e-3},
           "checkpoint_every": 4, "keep_last": 2, "log_every": 2, "seed": 3, "threads": 1,
           # fp32: numeric comparisons (DDP vs one process, resume) are made at fp32 tolerances;
           # "auto" may resolve to bf16 on this CPU (ijepa.precision), which has its own tests
           "precision": "fp32", "deterministic": True, "progress": False}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def blob_images(n: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, channels]: a few Gaussian blobs per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.zeros((n, size, size, channels), np.float32)
    for i in range(n):
        for _ in range(3):
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(size / 8, size / 3)
            col = rng.uniform(0.3, 1.0, channels)
            out[i] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * col
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def make_shards(root: Path, n: int = 64, size: int = 16, channels: int = 1, per_shard: int = 32,
                seed: int = 0) -> Path:
    """A shard folder with a train split of `n` images.

    channels=3: the project's own writer (`ijepa.data.shard_dataset`, procedural scenes).
    channels=1: grey blob images written with webdataset's TarWriter and a manifest in the
    data library's format (so grey and RGB inputs are both exercised)."""
    root = Path(root)
    if channels == 3:
        from ijepa.data import shard_dataset

        shard_dataset({"source": "scenes", "image_size": size, "seed": seed, "maxcount": per_shard,
                       "scenes": {"sizes": {"train": n}}}, root)
        return root
    import webdataset as wds

    from ijepa.hashing import file_sha256
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    imgs = blob_images(n, size, channels, seed)
    shards = []
    for s in range(0, n, per_shard):
        name = f"train-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for i in range(s, min(n, s + per_shard)):
                buf = io.BytesIO()
                Image.fromarray(imgs[i, ..., 0]).save(buf, format="PNG")
                w.write({"__key__": f"{i:06d}", "png": buf.getvalue()})
        shards.append({"name": name, "bytes": (root / name).stat().st_size, "samples": min(n, s + per_shard) - s,
                       "sha256": file_sha256(root / name)})
    manifest = {"format_version": 1, "dataset": "blobs", "image_size": size, "channels": channels, "labels": {},
                "splits": {"train": {"samples": n, "shards": shards}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


# ----------------------------------------------------------------------------- grey labelled shards
def fake_fashion_mnist(root: Path, n_train: int = 60, n_test: int = 20, size: int = 28, seed: int = 0) -> Path:
    """The four Fashion-MNIST idx files (gzip) with `n_train` / `n_test` grey `size`-px images of 10
    classes (class c: a bright band at a class-dependent row, on noise), for the fashion_mnist source."""
    import gzip
    import struct

    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 60, (n, size, size), dtype=np.uint8)
        for i, c in enumerate(labels):
            row = int(c) * (size - 3) // 9
            images[i, row:row + 3] = 220
        with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">HBBIII", 0, 0x08, 3, n, size, size) + images.tobytes())
        with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">HBBI", 0, 0x08, 1, n) + labels.tobytes())
    return root


def grey_shards(out: Path, idx_root: Path, val_size: int = 20) -> Path:
    """Fashion-MNIST-format shards (grey 28 px, train/val/test, label cls) of `fake_fashion_mnist` files."""
    from ijepa.data import shard_dataset

    shard_dataset({"source": "fashion_mnist", "image_size": 28,
                   "fashion_mnist": {"root": str(idx_root), "val_size": val_size}}, out, progress=False)
    return out


# ----------------------------------------------------------------------------- real services
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def postgres():
    """One throw-away PostgreSQL cluster on 127.0.0.1 for the session (tests/services.py); each
    test makes its own database with `services.create_database`. Skipped only when the server
    binaries are not installed (.ci/install_postgres.sh installs them)."""
    from services import postgres_cluster, postgres_missing

    reason = postgres_missing()
    if reason:
        pytest.skip(reason)
    with postgres_cluster() as pg:
        yield pg


@pytest.fixture
def nan_loss_at(monkeypatch):
    """nan_loss_at(n): the I-JEPA loss turns NaN at its n-th call (n-th training step, 1-based)."""
    from ijepa.methods import ijepa as ijepa_method

    def install(n: int) -> None:
        real = ijepa_method.jepa_loss
        calls = {"n": 0}

        def patched(pred, target, kind="l2"):
            calls["n"] += 1
            loss = real(pred, target, kind)
            return loss * float("nan") if calls["n"] == n else loss

        monkeypatch.setattr(ijepa_method, "jepa_loss", patched)

    return install
