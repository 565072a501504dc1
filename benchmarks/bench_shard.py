"""Sharding throughput (images/s, one process) per source at default-ish settings.

- scenes: 64 px RGB PNG, generated on the fly (generation + PNG encoding + tar writing).
- fashion_mnist: 28 px grey PNG from the Debian idx files (skipped, reported as null, when
  /usr/share/datasets/fashion-mnist is absent); idx loading is not timed.
- imagefolder: a generated tree of 320x240 JPEGs (2 classes) resized/cropped to 64 px PNG
  (``store: square``; photos kept whole are measured by bench_photos).

Rates are wall-clock samples/s as `ShardResult.samples_per_s` reports them, plus the same
count over process CPU time (less sensitive to other load on the machine).

    python benchmarks/bench_shard.py            # prints JSON
    python benchmarks/bench_shard.py --quick    # smaller counts
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ijepa.data import shard_dataset
from ijepa.data.config import FASHION_MNIST_DIR


def _timed(cfg: dict, out: Path) -> tuple[float, float, int]:
    c0 = time.process_time()
    res = shard_dataset({**cfg, "workers": 1}, out, progress=False)  # one process, as the figures say
    cpu = time.process_time() - c0
    return res.samples_per_s, res.samples / cpu if cpu > 0 else 0.0, res.samples


def _make_tree(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = np.stack(np.meshgrid(np.linspace(0, 255, 320), np.linspace(0, 255, 240)), -1)
    for i in range(n):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        noise = rng.normal(0, 20, (240, 320, 1))
        arr = np.clip(np.concatenate([base, (base[..., :1] + i) % 255], -1) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i:05d}.jpg", quality=90)


def run(n_scenes: int = 2000, n_fashion: int = 10000, n_folder: int = 300) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wall, cpu, n = _timed({"source": "scenes", "scenes": {"sizes": {"train": n_scenes}}}, tmp / "scenes")
        out.update(scenes_img_s=round(wall, 1), scenes_cpu_img_s=round(cpu, 1), scenes_n=n)
        if all((Path(FASHION_MNIST_DIR) / f).exists() for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")):
            wall, cpu, n = _timed({"source": "fashion_mnist",
                                   "max_samples": {"train": n_fashion, "val": 0, "test": 0}}, tmp / "fm")
            out.update(fashion_mnist_img_s=round(wall, 1), fashion_mnist_cpu_img_s=round(cpu, 1), fashion_mnist_n=n)
        else:
            out.update(fashion_mnist_img_s=None, fashion_mnist_cpu_img_s=None, fashion_mnist_n=0)
        _make_tree(tmp / "tree", n_folder)
        wall, cpu, n = _timed({"source": "imagefolder", "image_size": 64,
                               "imagefolder": {"root": str(tmp / "tree"), "store": "square"}}, tmp / "folder")
        out.update(imagefolder_img_s=round(wall, 1), imagefolder_cpu_img_s=round(cpu, 1), imagefolder_n=n,
                   imagefolder_input="320x240 JPEG q90 -> 64 px PNG")
    out["loadavg_1m"] = round(os.getloadavg()[0], 2)
    out["cpus"] = os.cpu_count()
    return out


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    print(json.dumps(run(500, 3000, 100) if quick else run(), indent=2))
