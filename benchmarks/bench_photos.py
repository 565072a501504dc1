"""Real photos at 224 px: sharding, the training input, and what a GPU step needs.

On a generated folder of `n` photo-like JPEGs of mixed sizes (`photo_folder`, 300-800 px per
side, quality 90):

- sharding (`ijepa.data.shard_dataset`, imagefolder ``store: photo``, max_side 512): images/s
  in ONE process (`shard_img_s_per_core`) and with every core (`shard_img_s_all_cores`), and
  shard bytes / source bytes (`shard_bytes_ratio`);
- training input at 224 px (`ijepa.train_input.TrainInput` on those shards, paper masks on
  the 14 x 14 grid of vit_b16, batch `batch_size`): decode + RandomResizedCrop + masks,
  images/s with 0, 1 and 2 DataLoader workers (`loader_img_s`), timed from the loader's
  creation (worker start included) over `steps` batches, main process at 1 thread; `loader_img_s_per_core` = the 0-worker rate (one core);
- what one I-JEPA step consumes (`step_need_img_s`): model FLOPs per image from the presets'
  shapes and the MEAN token counts of our mask generator at 224 px (context encoder and
  predictor forward + backward = 3x forward, target encoder forward only; matmul FLOPs:
  2 * tokens * (4 D^2 + 2 D * mlp) + 4 * tokens^2 * D per block, patch embedding and
  predictor projections included; norms, softmax and the optimiser left out), at `mfu` of one
  H100 SXM's dense bf16 peak (989 TFLOP/s); `cores_per_gpu` = need / loader_img_s_per_core.

Run the timed parts through /work/bin/quiet (alone on the machine):

    python benchmarks/bench_photos.py --n 2000          # prints JSON
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["run", "step_flops_per_image", "render"]

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM, dense bf16 (no sparsity)


def _block_flops(tokens: float, dim: int, mlp_ratio: float) -> float:
    return 2 * tokens * (4 * dim * dim + 2 * dim * dim * mlp_ratio) + 4 * tokens * tokens * dim


def step_flops_per_image(preset: str, image_size: int = 224, draws: int = 64) -> dict:
    """FLOPs of one I-JEPA train step per image for a preset at `image_size` (see the docstring)."""
    from ijepa.masks import MaskConfig, MaskGenerator, make_generator
    from ijepa.models import PRESETS

    m = PRESETS[preset]
    e, p = m.encoder, m.predictor
    grid = image_size // e.patch_size
    n = grid * grid
    gen = MaskGenerator(MaskConfig(), (grid, grid))
    ctx, tgt = [], []
    for i in range(draws):
        masks = gen(32, make_generator(0, i))
        ctx.append(masks.context.shape[-1])
        tgt.append(masks.targets.shape[-1])
    n_ctx, n_tgt = sum(ctx) / draws, sum(tgt) / draws
    npred = masks.targets.shape[0]
    patch = 2 * n * (3 * e.patch_size ** 2) * e.embed_dim
    enc = lambda tokens: e.depth * _block_flops(tokens, e.embed_dim, e.mlp_ratio)  # noqa: E731
    target = patch + enc(n)
    context = patch * n_ctx / n + enc(n_ctx)
    pred_tokens = n_ctx + n_tgt
    predictor = npred * (p.depth * _block_flops(pred_tokens, p.embed_dim, p.mlp_ratio)
                         + 2 * pred_tokens * e.embed_dim * p.embed_dim + 2 * n_tgt * p.embed_dim * e.embed_dim)
    total = target + 3 * (context + predictor)
    return {"flops_per_image": total, "grid": grid, "mean_context_tokens": round(n_ctx, 1),
            "mean_target_tokens_per_block": round(n_tgt, 1), "npred": npred,
            "parts_gflop": {"target_forward": round(target / 1e9, 2), "context_fwd_bwd": round(3 * context / 1e9, 2),
                            "predictor_fwd_bwd": round(3 * predictor / 1e9, 2)}}


def _loader_rate(shards: Path, workers: int, batch_size: int, steps: int) -> float:
    from ijepa.train_config import load_config
    from ijepa.train_input import TrainInput
    from ijepa.trainer import prepare

    cfg = load_config({"model": {"preset": "vit_b16"}, "num_workers": workers, "data": {"mode": "memory"},
                       "optimisation": {"batch_size": batch_size, "total_steps": steps}})
    plan = prepare(cfg, shards, verify=False)
    inp = TrainInput(cfg, plan.shards, plan.masker, batch_size, 0, 1, torch.device("cpu"))
    t0 = time.perf_counter()  # prefetching workers would flatter a rate timed after a warm-up
    it = inp.batches(0, steps)
    for _ in range(steps):
        next(it)
    rate = steps * batch_size / (time.perf_counter() - t0)
    del it
    return rate


def run(n: int = 2000, batch_size: int = 64, steps: int = 30, mfu: float = 0.4,
        work: str | None = None) -> dict:
    from photo_folder import write_photo_folder

    from ijepa.data import shard_dataset

    torch.set_num_threads(1)
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        src = write_photo_folder(Path(tmp) / "photos", n=n)
        bytes_in = sum(p.stat().st_size for p in src.rglob("*.jpg"))
        cfg = {"source": "imagefolder", "image_size": 224, "jpeg_quality": 90,
               "imagefolder": {"root": str(src), "store": "photo", "max_side": 512}}
        shard = {}
        for workers in (1, cores):
            r = shard_dataset({**cfg, "workers": workers}, Path(tmp) / f"shards{workers}", progress=False)
            shard[workers] = r.samples / r.seconds
            bytes_out = sum(s["bytes"] for s in r.manifest["splits"].values())
            kept = r.manifest
        shards = Path(tmp) / "shards1"
        loader = {w: _loader_rate(shards, w, batch_size, steps) for w in (0, 1, 2)}
    need = {}
    for preset in ("vit_b16", "vit_h14"):
        f = step_flops_per_image(preset)
        img_s = mfu * H100_BF16_DENSE / f["flops_per_image"]
        need[preset] = {"img_s": round(img_s, 0), "gflop_per_image": round(f["flops_per_image"] / 1e9, 2),
                        "cores_per_gpu": round(img_s / loader[0], 1), **{k: v for k, v in f.items()
                                                                         if k != "flops_per_image"}}
    return {
        "shard_img_s_per_core": round(shard[1], 1),
        "shard_img_s_all_cores": round(shard[cores], 1),
        "shard_bytes_ratio": round(bytes_out / bytes_in, 3),
        "bytes_in": bytes_in, "bytes_out": bytes_out,
        "shard_samples": kept["samples"], "skipped": kept["skipped"],
        "loader_img_s": {str(w): round(v, 1) for w, v in loader.items()},
        "loader_img_s_per_core": round(loader[0], 1),
        "loader_speedup_2_workers": round(loader[2] / loader[0], 2),
        "step_need_img_s": {k: v["img_s"] for k, v in need.items()},
        "step_need": need,
        "config": {"images": n, "sides": [300, 800], "source_quality": 90, "max_side": 512, "image_size": 224,
                   "batch_size": batch_size, "timed_batches": steps, "mfu": mfu,
                   "gpu_peak_flop_s": H100_BF16_DENSE, "cores": cores, "masks": "paper values (MaskConfig())",
                   "augmentation": "RandomResizedCrop scale (0.3, 1.0)"},
    }


def render(ph: dict, _fmt) -> list[str]:
    """The RESULTS.md lines of this section (`_fmt`: run_all's number formatter)."""
    lines: list[str] = []
    c, need = ph.get("config", {}), ph.get("step_need", {})
    ld = ph.get("loader_img_s", {})
    lines += [f"### Photos at {c.get('image_size')} px ({c.get('images')} generated JPEGs, sides "
              f"{c.get('sides')}, `bench_photos.py`)", "",
              "| measure | value |", "|---|---|",
              f"| sharding img/s, one process / all {c.get('cores')} cores | {_fmt(ph.get('shard_img_s_per_core'))} / "
              f"{_fmt(ph.get('shard_img_s_all_cores'))} |",
              f"| shard bytes / source bytes (max_side {c.get('max_side')}) | {_fmt(ph.get('shard_bytes_ratio'), 3)} |",
              f"| training input img/s (decode + crop + masks, batch {c.get('batch_size')}), 0 / 1 / 2 workers | "
              f"{_fmt(ld.get('0'))} / {_fmt(ld.get('1'))} / {_fmt(ld.get('2'))} |",
              f"| 2 workers vs 0 | {_fmt(ph.get('loader_speedup_2_workers'), 2)}x |"]
    for preset, e in need.items():
        lines.append(f"| {preset} I-JEPA step on one H100 at {int(100 * c.get('mfu', 0))} % MFU: img/s consumed "
                     f"({_fmt(e.get('gflop_per_image'))} GFLOP per image) / loader cores needed | "
                     f"{_fmt(e.get('img_s'), 0)} / {_fmt(e.get('cores_per_gpu'))} |")
    lines.append("")
    return lines


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    print(json.dumps(run(a.n, a.batch_size, a.steps), indent=2))
