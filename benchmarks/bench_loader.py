"""Loader throughput: decoding WebDataset shards (images/s) against what the train step consumes.

Shards: `n` Fashion-MNIST train images (28 px grey PNG, the default job's data and the train
step benchmark's input shape) written with `ijepa.data.shard_dataset` into a temporary folder;
procedural 28 px scenes when /usr/share/datasets/fashion-mnist is absent. Two readers of
`ijepa.train_data`, each timed over whole epochs (median of `repeats`):

- `img_s` (the headline): `StreamBatches`, the streaming reader used for large datasets
  (webdataset, PNG decode, shuffle buffer, batching), ONE process, ``num_workers=0`` -- the
  most conservative setting (workers add throughput on more cores);
- `memory_decode_img_s`: `load_train_images`, the one-time decode of the in-memory mode.

`ratio` = img_s / train_consumption_img_s, where the consumption is the faster of our train
step's fp32 / bf16 images/s (from bench_train_step in the same run; measured here when not
given).

    python benchmarks/bench_loader.py           # prints JSON
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from ijepa.data import shard_dataset
from ijepa.data.config import FASHION_MNIST_DIR
from ijepa.train_data import StreamBatches, load_train_images, read_shard_info

__all__ = ["run"]


def _write_shards(out: Path, n: int, image_size: int) -> str:
    have_fm = all((Path(FASHION_MNIST_DIR) / f).exists() for f in ("train-images-idx3-ubyte.gz",
                                                                    "train-labels-idx1-ubyte.gz"))
    if have_fm and image_size == 28:
        shard_dataset({"source": "fashion_mnist", "max_samples": {"train": n, "val": 0, "test": 0}}, out,
                      progress=False)
        return "fashion_mnist"
    shard_dataset({"source": "scenes", "image_size": image_size, "scenes": {"sizes": {"train": n}}}, out,
                  progress=False)
    return "scenes"


def run(n: int = 10000, batch_size: int = 64, repeats: int = 3, image_size: int = 28,
        train_consumption_img_s: float | None = None, shuffle_buffer: int = 1000) -> dict:
    if train_consumption_img_s is None:
        import bench_train_step

        ts = bench_train_step.run(batch_size=batch_size, steps=4, warmup=1)
        train_consumption_img_s = max(ts["ours_img_s"], ts["ours_bf16_img_s"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "shards"
        source = _write_shards(root, n, image_size)
        info = read_shard_info(root)
        reader = StreamBatches(info, batch_size, 0, 1, seed=0, num_workers=0, shuffle_buffer=shuffle_buffer)
        stream, memory = [], []
        for epoch in range(repeats):
            t0 = time.perf_counter()
            count = sum(b.shape[0] for b in reader.batches(epoch))
            stream.append(count / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            imgs = load_train_images(info)
            memory.append(imgs.shape[0] / (time.perf_counter() - t0))
    img_s = statistics.median(stream)
    return {
        "img_s": round(img_s, 1),
        "train_consumption_img_s": round(train_consumption_img_s, 1),
        "ratio": round(img_s / train_consumption_img_s, 2),
        "memory_decode_img_s": round(statistics.median(memory), 1),
        "stream_img_s_all": [round(x, 1) for x in stream],
        "config": {"source": source, "images": n, "image_size": image_size, "batch_size": batch_size,
                   "num_workers": 0, "shuffle_buffer": shuffle_buffer, "repeats": repeats},
    }


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--consumption", type=float, default=None, help="train step images/s (measured if absent)")
    a = ap.parse_args()
    print(json.dumps(run(a.n, a.batch_size, a.repeats, train_consumption_img_s=a.consumption), indent=2))
