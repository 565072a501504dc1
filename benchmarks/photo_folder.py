"""A generated folder of photo-like JPEGs (ImageNet layout) for the loader benchmark and the tests.

Each image: a smooth colour field (bilinearly upsampled coarse noise), a few soft-edged
ellipses and rectangles, fine texture and sensor-like noise, so that JPEG compresses it about
as it compresses a photo; sides drawn uniformly in [min_side, max_side] per axis, saved as
JPEG at `quality` (a few as PNG with `png_every`). Deterministic from the seed.

    python benchmarks/photo_folder.py OUT --n 2000
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["photo", "write_photo_folder"]


def photo(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """uint8 [h, w, 3] photo-like image."""
    from PIL import Image, ImageDraw, ImageFilter

    coarse = rng.integers(0, 256, (rng.integers(2, 6), rng.integers(2, 6), 3), dtype=np.uint8)
    im = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(rng.integers(3, 9)):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2))
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=col)
    im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.8, 2.5))))
    arr = np.asarray(im, dtype=np.float32)
    texture = Image.fromarray(rng.integers(0, 256, (h // 4 + 1, w // 4 + 1), dtype=np.uint8)).resize(
        (w, h), Image.Resampling.BILINEAR)
    arr += (np.asarray(texture, np.float32)[:, :, None] - 128.0) * 0.12
    arr += rng.normal(0.0, 3.0, arr.shape).astype(np.float32)
    return np.clip(arr, 0, 255).astype(np.uint8)


def write_photo_folder(root: str | Path, n: int = 2000, classes: int = 4, min_side: int = 300, max_side: int = 800,
                       quality: int = 90, seed: int = 0, png_every: int = 0) -> Path:
    """`n` images in root/class_<k>/img_<i>.jpg (every `png_every`-th as .png when > 0)."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(photo(rng, w, h))
        if png_every and i % png_every == png_every - 1:
            im.save(folder / f"img_{i:05d}.png")
        else:
            im.save(folder / f"img_{i:05d}.jpg", quality=quality)
    return root


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=2000)
    a = ap.parse_args()
    print(write_photo_folder(a.out, a.n))
