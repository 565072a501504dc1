"""Procedural CLEVR-like scenes: numpy only, deterministic, a few thousand images/s at 64 px.

A scene is a ground plane seen by a pinhole camera above it (horizon, sky and ground
gradients) with 3 to 10 objects: spheres, cubes, cylinders and cones in 8 colours, two
sizes and two materials (rubber: matte, metal: sharp highlight), each standing on the
ground at a depth ``z``. Perspective: an object's ground contact is drawn at
``y = horizon + K * S / z`` and its apparent size is ``K * S * height / z`` (S = image
size), so nearer objects are lower and larger. Objects are painted far-to-near, so near
objects occlude far ones, each after its soft shadow; edges are anti-aliased.

Layout (`sample_layout`): the closest object's depth is uniform in
``[near, closest_max]`` (so the 6 depth bins are balanced); the others are uniform in
``[z_closest + gap, far]``. An object whose bounding box overlaps an already placed
one by more than `max_overlap` of the smaller box is re-drawn (bounded tries) and
dropped if it never fits. After painting, any object with less than `min_visible` of its
own pixels visible is removed and the scene re-painted, so every counted object is
really visible.

Labels: ``count`` = objects drawn (3..10), ``depth`` = bin of the closest object's depth
(equal-width bins over [near, closest_max], 0 = nearest), ``cls`` = shape index of the
closest object (`SHAPES`).

Determinism: image `index` of `split` uses ``rng_for(seed, split, index)``, so any image is
reproducible on its own and splits are independent.

Speed: positions and apparent heights are on a 1/2-pixel grid, so each object is drawn from
a cached colour-independent sprite (coverage, shading, highlight, shadow) keyed by
(shape, material, height, sub-pixel offset); the cache only saves time, never changes pixels.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ijepa.data.common import Sample
from ijepa.data.config import ScenesConfig
from ijepa.seeding import rng_for

__all__ = ["SHAPES", "COLORS", "SceneGeometry", "SceneObject", "SceneLayout", "GEOMETRY",
           "sample_layout", "render", "depth_bin", "scene_labels", "make_scene", "generate",
           "ScenesSource", "label_schema"]

SHAPES = ("sphere", "cube", "cylinder", "cone")
COLORS = {  # CLEVR's palette, slightly brightened
    "gray": (110, 110, 110), "red": (190, 40, 40), "blue": (45, 85, 225), "green": (35, 130, 30),
    "brown": (140, 85, 35), "purple": (135, 45, 200), "cyan": (45, 210, 210), "yellow": (245, 225, 50),
}
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)

_L = np.array([-0.45, -0.65, 0.62], dtype=np.float32)
_L /= np.linalg.norm(_L)
_H = _L + np.array([0.0, 0.0, 1.0], dtype=np.float32)
_H /= np.linalg.norm(_H)
_LX, _LY, _LZ = (float(v) for v in _L)
_HX, _HY, _HZ = (float(v) for v in _H)


@dataclass(frozen=True)
class SceneGeometry:
    """Camera and placement constants (world units are arbitrary; only ratios matter)."""

    near: float = 4.0            # nearest possible depth
    closest_max: float = 10.0    # the closest object's depth is uniform in [near, closest_max]
    far: float = 12.0            # farthest depth
    gap: float = 0.4             # other objects are at least this much farther than the closest
    horizon: tuple[float, float] = (0.30, 0.38)   # horizon row as a fraction of the height
    contact_near: float = 0.95   # ground contact row (fraction) of an object at depth `near`
    heights: tuple[float, float] = (0.36, 0.54)   # world heights: small, large
    min_px: float = 3.0          # smallest apparent height in pixels
    max_overlap: float = 0.3     # bbox intersection / smaller bbox area allowed
    tries: int = 12              # placement tries per object
    min_visible: float = 0.25    # fraction of an object's own pixels that must stay visible
    quantum: int = 2             # positions and heights are multiples of 1/quantum pixel


GEOMETRY = SceneGeometry()


@dataclass(frozen=True)
class SceneObject:
    shape: int          # index into SHAPES
    color: int          # index into COLORS
    large: bool
    metal: bool
    depth: float        # distance z from the camera along the ground
    cx: float           # centre column (pixels, continuous)
    bottom: float       # ground contact row (pixels)
    height: float       # apparent height (pixels)
    width: float        # apparent width (pixels)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in pixels, continuous."""
        return (self.cx - self.width / 2, self.bottom - self.height, self.cx + self.width / 2, self.bottom)


@dataclass(frozen=True)
class SceneLayout:
    size: int
    horizon: float                   # horizon row in pixels
    ground: tuple[float, float, float]  # ground tint
    objects: tuple[SceneObject, ...]  # placement order: objects[0] is the closest

    @property
    def count(self) -> int:
        return len(self.objects)

    @property
    def closest(self) -> SceneObject:
        return min(self.objects, key=lambda o: o.depth)

    def paint_order(self) -> list[int]:
        """Object indices far-to-near (the painter's order)."""
        return sorted(range(len(self.objects)), key=lambda i: -self.objects[i].depth)


_WIDTH = (1.0, 0.8, 0.75, 0.9)  # apparent width / height per shape


def sample_layout(rng: np.random.Generator, size: int, cfg: ScenesConfig = ScenesConfig(),
                  geom: SceneGeometry = GEOMETRY) -> SceneLayout:
    """Draw one scene layout (before the visibility check of `make_scene`)."""
    hz = float(rng.uniform(*geom.horizon))
    ground = tuple(float(v) for v in rng.uniform(-18, 18, 3))
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    shapes = rng.integers(0, len(SHAPES), n)
    colors = rng.integers(0, len(COLORS), n)
    large = rng.random(n) < 0.5
    metal = rng.random(n) < 0.5
    z0 = float(rng.uniform(geom.near, geom.closest_max))
    zs = rng.uniform(z0 + geom.gap, geom.far, (n, geom.tries))
    zs[0, :] = z0
    us = rng.random((n, geom.tries))
    # every candidate's projection at once (vectorised), then sequential acceptance
    k = (geom.contact_near - hz) * geom.near * size
    bottoms = hz * size + k / zs
    hs = np.maximum(geom.min_px, k * np.asarray(geom.heights)[large.astype(np.int64)][:, None] / zs)
    # positions and heights on a 1/Q px grid: sprites are cached per (shape, material, height, sub-pixel offset)
    q = geom.quantum
    hs = np.round(hs * q) / q
    ws = hs * np.asarray(_WIDTH)[shapes][:, None]
    cxs = np.round(np.where(size > ws, ws / 2 + us * (size - ws), size / 2) * q) / q
    bottoms = np.round(bottoms * q) / q
    Z, B, Hh, W, C = zs.tolist(), bottoms.tolist(), hs.tolist(), ws.tolist(), cxs.tolist()
    placed: list[SceneObject] = []
    boxes: list[tuple[float, float, float, float]] = []
    lim = geom.max_overlap
    for i in range(n):
        for t in range(geom.tries):
            cx, b, h, w = C[i][t], B[i][t], Hh[i][t], W[i][t]
            x0, y0, x1 = cx - w / 2, b - h, cx + w / 2
            area = w * h
            ok = True
            for (p0, q0, p1, q1) in boxes:
                iw = min(x1, p1) - max(x0, p0)
                ih = min(b, q1) - max(y0, q0)
                if iw > 0 and ih > 0 and iw * ih > lim * min(area, (p1 - p0) * (q1 - q0)):
                    ok = False
                    break
            if ok:
                placed.append(SceneObject(int(shapes[i]), int(colors[i]), bool(large[i]), bool(metal[i]),
                                          Z[i][t], cx, b, h, w))
                boxes.append((x0, y0, x1, b))
                break
    return SceneLayout(size, hz * size, ground, tuple(placed))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ painting
def _background(layout: SceneLayout) -> np.ndarray:
    s = layout.size
    y = np.arange(s, dtype=np.float32) + 0.5
    hy = layout.horizon
    t_sky = np.clip(y / max(hy, 1e-6), 0, 1)[:, None]
    sky = np.array([125, 145, 175], np.float32) * (1 - t_sky) + np.array([205, 210, 218], np.float32) * t_sky
    t_g = np.clip((y - hy) / max(s - hy, 1e-6), 0, 1)[:, None]
    g = np.array([178, 175, 168], np.float32) + np.array(layout.ground, np.float32)
    ground = g * (1 - t_g) + (g * 0.62) * t_g
    col = np.where((y < hy)[:, None], sky, ground)
    return np.repeat(col[:, None, :], s, axis=1)


def _clip(x, lo, hi):
    """np.clip without its Python-level overhead (matters for small arrays)."""
    return np.minimum(np.maximum(x, lo), hi)


def _alpha(sdf: np.ndarray) -> np.ndarray:
    return _clip(0.5 - sdf, 0.0, 1.0)


def _ellipse_sdf(X, Y, cx, cy, a, b):
    a, b = max(a, 0.5), max(b, 0.5)
    return (np.sqrt(((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2) - 1.0) * min(a, b)


def _trapezoid_sdf(X, Y, cx, y0, y1, hw0, hw1):
    t = _clip((Y - y0) / max(y1 - y0, 1e-6), 0.0, 1.0)
    hw = hw0 + (hw1 - hw0) * t
    return np.maximum(np.maximum(np.abs(X - cx) - hw, y0 - Y), Y - y1)


def _spec(nx, ny, nz, metal: bool):
    d = _clip(nx * _HX + ny * _HY + nz * _HZ, 0.0, 1.0)
    return (0.9 * d ** 40) if metal else (0.12 * d ** 10)


@functools.lru_cache(maxsize=4096)
def _sprite(shape: int, metal: bool, h: float, fx: float, fy: float):
    """Colour-independent maps of one object, cached: the object's ground contact centre is
    at (dx0 + fx, dy0 + fy) in sprite pixels. Returns (dx0, dy0, keep, shade_a, spec_a, hit):
    painting is ``region = region * keep + shade_a * colour + spec_a`` (shadow, then the
    object over it with anti-aliased coverage a), ``hit`` = pixels with coverage >= 0.5."""
    w = h * _WIDTH[shape]
    dx0 = int(math.ceil(0.55 * w + 1))
    dy0 = int(math.ceil(h + 1))
    cols = dx0 + int(math.ceil(1.1 * w + 1)) + 1
    rows = dy0 + int(math.ceil(0.2 * w + 1)) + 1
    X = np.arange(cols, dtype=np.float32)[None, :] + 0.5
    Y = np.arange(rows, dtype=np.float32)[:, None] + 0.5
    cx, yb = dx0 + fx, dy0 + fy
    # shadow on the ground, to the lower right (light from the upper left)
    sh = _alpha(_ellipse_sdf(X, Y, cx + 0.4 * w, yb - 0.03 * h, 0.7 * w, max(0.8, 0.17 * w)))
    r = w / 2
    if shape == 0:  # sphere
        cy = yb - r
        a = _alpha(np.sqrt((X - cx) ** 2 + (Y - cy) ** 2) - r)
        nx, ny = (X - cx) / r, (Y - cy) / r
        nz = np.sqrt(_clip(1.0 - nx * nx - ny * ny, 0.0, 1.0))
        d = _clip(nx * _LX + ny * _LY + nz * _LZ, 0.0, 1.0)
        shade, spec = 0.3 + 0.8 * d, _spec(nx, ny, nz, metal)
    elif shape == 1:  # cube: front face + top face
        front_top = yb - 0.8 * h
        a_front = _alpha(_trapezoid_sdf(X, Y, cx, front_top, yb, r, r))
        a_top = _alpha(_trapezoid_sdf(X, Y, cx, yb - h, front_top, 0.8 * r, r))
        a = np.maximum(a_front, a_top)
        grad = _clip((Y - front_top) / max(yb - front_top, 1e-6), 0, 1)
        shade = np.where(a_top > a_front, 1.0, 0.78 - 0.12 * grad)
        spec = np.where(a_top > a_front, 0.25 if metal else 0.05, 0.0)
    else:
        e = max(0.6, 0.12 * h)  # ellipse half-height of the circular faces
        nx = _clip((X - cx) / max(r, 1e-6), -1.0, 1.0)
        nz = np.sqrt(1.0 - nx * nx)
        if shape == 2:  # cylinder: body with round bottom, lit top ellipse
            body = np.minimum(_trapezoid_sdf(X, Y, cx, yb - h + e, yb - e, r, r),
                              _ellipse_sdf(X, Y, cx, yb - e, r, e))
            a_top = _alpha(_ellipse_sdf(X, Y, cx, yb - h + e, r, e))
            a = np.maximum(_alpha(body), a_top)
            d = _clip(nx * _LX + nz * _LZ, 0.0, 1.0)
            top = a_top >= 0.5
            shade = np.where(top, 1.02, 0.3 + 0.75 * d)
            spec = np.where(top, 0.0, _spec(nx, 0.0, nz, metal))
        else:  # cone: triangle to a round base
            body = np.minimum(_trapezoid_sdf(X, Y, cx, yb - h, yb - e, 0.0, r),
                              _ellipse_sdf(X, Y, cx, yb - e, r, e))
            a = _alpha(body)
            t = _clip((Y - (yb - h)) / max(h - e, 1e-6), 0.05, 1.0)
            nxl = _clip((X - cx) / (r * t), -1.0, 1.0)
            nzl = np.sqrt(1.0 - nxl * nxl)
            d = _clip(0.85 * (nxl * _LX + nzl * _LZ) + 0.35 * (-_LY), 0.0, 1.0)
            shade, spec = 0.25 + 0.8 * d, _spec(0.85 * nxl, -0.5, 0.85 * nzl, metal)
    a = np.broadcast_to(a, (rows, cols)).astype(np.float32)
    keep = ((1.0 - 0.38 * sh) * (1.0 - a))[:, :, None].astype(np.float32)
    shade_a = (np.asarray(shade, np.float32) * a)[:, :, None]
    spec_a = (255.0 * np.asarray(spec, np.float32) * a)[:, :, None]
    hit = a >= 0.5
    for arr in (keep, shade_a, spec_a, hit):
        arr.setflags(write=False)
    return dx0, dy0, keep, shade_a, spec_a, hit


def _paint_object(canvas: np.ndarray, ids: np.ndarray, own: np.ndarray, idx: int, o: SceneObject) -> None:
    s = canvas.shape[0]
    ix, iy = int(math.floor(o.cx)), int(math.floor(o.bottom))
    dx0, dy0, keep, shade_a, spec_a, hit = _sprite(o.shape, o.metal, o.height, o.cx - ix, o.bottom - iy)
    rows, cols = hit.shape
    top, left = iy - dy0, ix - dx0
    y0, y1 = max(0, top), min(s, top + rows)
    x0, x1 = max(0, left), min(s, left + cols)
    if x1 <= x0 or y1 <= y0:
        return
    sy, sx = slice(y0 - top, y1 - top), slice(x0 - left, x1 - left)
    region = canvas[y0:y1, x0:x1]
    region *= keep[sy, sx]
    region += shade_a[sy, sx] * _PALETTE[o.color]
    region += spec_a[sy, sx]
    h = hit[sy, sx]
    ids[y0:y1, x0:x1][h] = idx
    own[idx] = int(hit.sum())


def render(layout: SceneLayout, return_ids: bool = False):
    """Paint `layout` -> uint8 [S, S, 3] (and, with return_ids, int16 [S, S] object index per
    pixel, -1 for background, plus each object's own pixel count before occlusion)."""
    canvas = _background(layout)
    ids = np.full((layout.size, layout.size), -1, np.int16)
    own = np.zeros(len(layout.objects), np.int64)
    for i in layout.paint_order():
        _paint_object(canvas, ids, own, i, layout.objects[i])
    img = _clip(canvas + 0.5, 0, 255).astype(np.uint8)
    return (img, ids, own) if return_ids else img


def visible_pixels(ids: np.ndarray, n: int) -> np.ndarray:
    """Visible pixel count of each object index 0..n-1 in an id map from `render`."""
    return np.bincount(ids.ravel().astype(np.int64) + 1, minlength=n + 1)[1:n + 1]


def depth_bin(z: float, bins: int = 6, geom: SceneGeometry = GEOMETRY) -> int:
    """Equal-width bin of depth z over [near, closest_max] (0 = nearest), clipped to the range."""
    t = (z - geom.near) / (geom.closest_max - geom.near)
    return int(min(bins - 1, max(0, math.floor(t * bins))))


def scene_labels(layout: SceneLayout, bins: int = 6, geom: SceneGeometry = GEOMETRY) -> dict[str, int]:
    c = layout.closest
    return {"count": layout.count, "depth": depth_bin(c.depth, bins, geom), "cls": c.shape}


def make_scene(rng: np.random.Generator, size: int, cfg: ScenesConfig = ScenesConfig(),
               geom: SceneGeometry = GEOMETRY) -> tuple[SceneLayout, np.ndarray]:
    """A layout with only visible objects and its image (re-drawn until min_objects are visible)."""
    for _ in range(100):
        layout = sample_layout(rng, size, cfg, geom)
        while len(layout.objects) >= cfg.min_objects:
            img, ids, own = render(layout, return_ids=True)
            vis = visible_pixels(ids, len(layout.objects))
            keep = [i for i, o in enumerate(layout.objects)
                    if vis[i] >= 1 and vis[i] >= geom.min_visible * max(own[i], 1)]
            if len(keep) == len(layout.objects):
                return layout, img
            layout = SceneLayout(layout.size, layout.horizon, layout.ground,
                                 tuple(layout.objects[i] for i in keep))
    raise RuntimeError(f"could not place {cfg.min_objects} visible objects at {size}px in 100 tries")


def generate(seed: int, split: str, index: int, size: int = 64, cfg: ScenesConfig = ScenesConfig(),
             geom: SceneGeometry = GEOMETRY) -> tuple[np.ndarray, dict[str, int], SceneLayout]:
    """Image `index` of `split`: (uint8 [S, S, 3], labels, layout); the same for the same arguments."""
    layout, img = make_scene(rng_for(seed, split, index), size, cfg, geom)
    return img, scene_labels(layout, cfg.depth_bins, geom), layout


def _render(seed: int, split: str, size: int, cfg: ScenesConfig, geom: SceneGeometry, index: int):
    img, labels, _ = generate(seed, split, index, size, cfg, geom)
    return img, labels


def label_schema(cfg: ScenesConfig = ScenesConfig(), geom: SceneGeometry = GEOMETRY) -> dict[str, dict]:
    edges = [geom.near + (geom.closest_max - geom.near) * i / cfg.depth_bins for i in range(cfg.depth_bins + 1)]
    return {
        "count": {"num_classes": cfg.max_objects + 1, "min": cfg.min_objects, "max": cfg.max_objects,
                  "names": [str(i) for i in range(cfg.max_objects + 1)],
                  "description": "number of objects drawn (the value itself; classes below min unused)"},
        "depth": {"num_classes": cfg.depth_bins, "names": [f"{edges[i]:.3g}-{edges[i + 1]:.3g}" for i in range(cfg.depth_bins)],
                  "edges": [round(e, 6) for e in edges],
                  "description": "distance of the closest object, equal-width bins, 0 = nearest"},
        "cls": {"num_classes": len(SHAPES), "names": list(SHAPES), "description": "shape of the closest object"},
    }


class ScenesSource:
    """`scenes` source: sizes per split from ScenesConfig.sizes."""

    name = "scenes"
    channels = 3

    def __init__(self, cfg: ScenesConfig, image_size: int = 64, seed: int = 0, geom: SceneGeometry = GEOMETRY):
        self.cfg, self.image_size, self.seed, self.geom = cfg, image_size, seed, geom

    def splits(self) -> list[str]:
        return list(self.cfg.sizes)

    def num_samples(self, split: str) -> int:
        return int(self.cfg.sizes[split])

    parallel = True  # iter_split takes a mapper (the shard writer's process pool)

    def iter_split(self, split: str, mapper=map) -> Iterator[Sample]:
        work = functools.partial(_render, self.seed, split, self.image_size, self.cfg, self.geom)
        for i, (img, labels) in enumerate(mapper(work, range(self.num_samples(split)))):
            yield Sample(f"{split}_{i:08d}", img, labels)

    def label_schema(self) -> dict[str, dict]:
        return label_schema(self.cfg, self.geom)

    def params(self) -> dict:
        from dataclasses import asdict

        g = asdict(self.geom)
        return {"sizes": dict(self.cfg.sizes), "min_objects": self.cfg.min_objects,
                "max_objects": self.cfg.max_objects, "depth_bins": self.cfg.depth_bins,
                "geometry": {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()},
                "shapes": list(SHAPES), "colors": list(COLORS)}

    def skipped(self, split: str) -> dict[str, int]:
        return {}
