"""Mask generation speed: our vectorised MaskGenerator vs a per-image Python loop.

The loop version below mimics the reference collator (facebookresearch/ijepa,
src/masks/multiblock.py): block sizes drawn once per batch and shared, then per image a
while-loop per block that places it, builds an [H, W] mask, constrains the context block
by the targets' complements, checks min_keep, and collects Python lists that are cut to
the shortest and collated. (Two of the reference's defects are fixed here so both versions
draw from the same distribution of positions: inclusive top/left bounds and bounded
retries; the speed is unaffected.) Both versions produce masks only (no images).

    python benchmarks/bench_masks.py            # prints JSON
"""
from __future__ import annotations

import json
import math
import statistics
import time

import torch
from torch.utils.data import default_collate

from ijepa.masks import MaskConfig, MaskGenerator, make_generator


class LoopMaskCollator:
    """Per-image Python-loop multi-block masks, in the style of the reference collator."""

    def __init__(self, cfg: MaskConfig, grid: tuple[int, int]):
        self.cfg = cfg
        self.height, self.width = grid

    def _sample_block_size(self, g, scale, aspect):
        s_lo, s_hi = scale
        a_lo, a_hi = aspect
        s = s_lo + torch.rand(1, generator=g).item() * (s_hi - s_lo)
        a = a_lo + torch.rand(1, generator=g).item() * (a_hi - a_lo)
        area = int(self.height * self.width * s)
        h = int(round(math.sqrt(area * a)))
        w = int(round(math.sqrt(area / a)))
        h = min(max(h, 1), self.height)
        w = min(max(w, 1), self.width)
        return h, w

    def _sample_block_mask(self, g, b_size, acceptable_regions=None):
        h, w = b_size
        tries = 0
        while True:
            top = torch.randint(0, self.height - h + 1, (1,), generator=g)
            left = torch.randint(0, self.width - w + 1, (1,), generator=g)
            mask = torch.zeros((self.height, self.width), dtype=torch.int32)
            mask[top:top + h, left:left + w] = 1
            if acceptable_regions is not None:
                for region in acceptable_regions:
                    mask *= region
            mask = torch.nonzero(mask.flatten())
            if len(mask) >= self.cfg.min_keep or acceptable_regions is None:
                break
            tries += 1
            if tries > 1000:
                raise RuntimeError("valid mask not found")
        mask = mask.squeeze(1)
        mask_complement = torch.ones((self.height, self.width), dtype=torch.int32)
        mask_complement[top:top + h, left:left + w] = 0
        return mask, mask_complement

    def __call__(self, batch_size: int, g: torch.Generator):
        cfg = self.cfg
        p_size = self._sample_block_size(g, cfg.pred_scale, cfg.pred_aspect)
        e_size = self._sample_block_size(g, cfg.enc_scale, cfg.enc_aspect)
        masks_pred, masks_enc = [], []
        min_keep_pred = min_keep_enc = self.height * self.width
        for _ in range(batch_size):
            mp, mc = [], []
            for _ in range(cfg.npred):
                mask, mask_c = self._sample_block_mask(g, p_size)
                mp.append(mask)
                mc.append(mask_c)
                min_keep_pred = min(min_keep_pred, len(mask))
            masks_pred.append(mp)
            regions = None if cfg.allow_overlap else mc
            me = []
            for _ in range(cfg.nenc):
                mask, _ = self._sample_block_mask(g, e_size, acceptable_regions=regions)
                me.append(mask)
                min_keep_enc = min(min_keep_enc, len(mask))
            masks_enc.append(me)
        masks_pred = default_collate([[m[:min_keep_pred] for m in ms] for ms in masks_pred])
        masks_enc = default_collate([[m[:min_keep_enc] for m in ms] for ms in masks_enc])
        return masks_enc, masks_pred


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run(batch_size: int = 256, grid: tuple[int, int] = (14, 14), repeats: int = 20,
        cfg: MaskConfig | None = None, threads: int | None = 1, seed: int = 0) -> dict:
    """Median seconds per batch of both versions, measured side by side (interleaved).

    threads: torch intra-op threads while measuring (1 = what a DataLoader worker gets;
    None leaves the setting alone).
    """
    cfg = cfg or MaskConfig()
    ours = MaskGenerator(cfg, grid)
    loop = LoopMaskCollator(cfg, grid)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        g1, g2 = make_generator(seed, 1), make_generator(seed, 2)
        ours(batch_size, g1)  # warm-up
        loop(batch_size, g2)
        t_ours, t_loop = [], []
        for _ in range(repeats):  # interleave so background load hits both alike
            t_ours += _time(lambda: ours(batch_size, g1), 1)
            t_loop += _time(lambda: loop(batch_size, g2), 1)
    finally:
        torch.set_num_threads(old_threads)
    m_ours, m_loop = statistics.median(t_ours), statistics.median(t_loop)
    return {
        "batch_size": batch_size, "grid": list(grid), "repeats": repeats,
        "threads": threads if threads is not None else old_threads,
        "ours_ms": round(m_ours * 1e3, 4), "loop_ms": round(m_loop * 1e3, 4),
        "ours_img_s": round(batch_size / m_ours, 1), "loop_img_s": round(batch_size / m_loop, 1),
        "ratio": round(m_loop / m_ours, 2),
    }


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--grid", type=int, nargs=2, default=(14, 14))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    print(json.dumps(run(a.batch_size, tuple(a.grid), a.repeats, threads=a.threads), indent=2))
