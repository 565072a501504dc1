"""Procedural scenes: determinism, label correctness (count = objects drawn, depth bins, closest shape)."""
from __future__ import annotations

import numpy as np
import pytest

from ijepa.data.config import ScenesConfig
from ijepa.data.scenes import (GEOMETRY, SHAPES, SceneLayout, ScenesSource, depth_bin, generate, label_schema,
                               make_scene, render, sample_layout, scene_labels, visible_pixels)
from ijepa.seeding import rng_for


def test_generate_is_deterministic_per_image_and_split_independent():
    a, la, _ = generate(7, "train", 3, 32)
    b, lb, _ = generate(7, "train", 3, 32)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and la == lb
    assert not np.array_equal(a, generate(7, "val", 3, 32)[0])    # splits draw independently
    assert not np.array_equal(a, generate(8, "train", 3, 32)[0])  # so do seeds
    assert not np.array_equal(a, generate(7, "train", 4, 32)[0])
    # the source yields exactly generate(seed, split, i) in index order
    src = ScenesSource(ScenesConfig(sizes={"train": 3}), image_size=32, seed=7)
    for i, s in enumerate(src.iter_split("train")):
        img, lab, _ = generate(7, "train", i, 32)
        assert s.key == f"train_{i:08d}" and np.array_equal(s.image, img) and s.labels == lab


@pytest.mark.parametrize("size", [32, 64])
def test_count_equals_objects_drawn_and_all_are_visible(size):
    cfg = ScenesConfig()
    for i in range(40):
        layout, img = make_scene(rng_for(1, "t", i), size, cfg)
        again, ids, own = render(layout, return_ids=True)
        assert np.array_equal(img, again)
        vis = visible_pixels(ids, layout.count)
        labels = scene_labels(layout, cfg.depth_bins)
        assert cfg.min_objects <= labels["count"] <= cfg.max_objects
        # every counted object has visible pixels in the final image, and nothing else is drawn
        assert labels["count"] == int((vis > 0).sum()) == len(set(np.unique(ids).tolist()) - {-1})
        assert (vis >= GEOMETRY.min_visible * own).all()


def test_closest_object_sets_depth_and_cls_labels():
    cfg = ScenesConfig()
    for i in range(40):
        img, labels, layout = generate(2, "train", i, 48, cfg)
        zs = [o.depth for o in layout.objects]
        closest = layout.objects[int(np.argmin(zs))]
        assert labels["depth"] == depth_bin(min(zs), cfg.depth_bins)
        assert labels["cls"] == closest.shape and 0 <= labels["cls"] < len(SHAPES)
        assert 0 <= labels["depth"] < cfg.depth_bins
        # the closest object is painted last, so it is fully visible
        assert layout.paint_order()[-1] == int(np.argmin(zs))


def test_perspective_closer_means_lower_larger_and_smaller_depth_bin():
    bins = [depth_bin(z) for z in np.linspace(GEOMETRY.near, GEOMETRY.closest_max, 200)]
    assert bins == sorted(bins) and bins[0] == 0 and bins[-1] == 5 and set(bins) == set(range(6))
    assert depth_bin(GEOMETRY.near - 1) == 0 and depth_bin(GEOMETRY.far) == 5
    for i in range(30):
        layout = sample_layout(rng_for(3, "p", i), 64)
        objs = sorted(layout.objects, key=lambda o: o.depth)
        for near, far in zip(objs, objs[1:]):
            assert near.bottom >= far.bottom  # nearer objects stand lower in the image
            if near.large == far.large and near.shape == far.shape:
                assert near.height >= far.height
        assert all(o.bottom > layout.horizon for o in objs)


def test_depth_labels_cover_all_bins_and_counts_vary():
    src = ScenesSource(ScenesConfig(sizes={"train": 120}), image_size=32, seed=0)
    labels = [s.labels for s in src.iter_split("train")]
    assert {l["depth"] for l in labels} == set(range(6))
    assert len({l["count"] for l in labels}) >= 6
    assert {l["cls"] for l in labels} == set(range(4))


def test_layout_render_shows_a_near_object_over_a_far_one():
    """Painter's order: two overlapping objects, the nearer one wins the shared pixels."""
    from ijepa.data.scenes import SceneObject

    far = SceneObject(0, 1, True, False, 9.0, 30.0, 40.0, 14.0, 14.0)
    near = SceneObject(1, 2, True, False, 5.0, 32.0, 50.0, 20.0, 16.0)
    layout = SceneLayout(64, 22.0, (0.0, 0.0, 0.0), (near, far))
    _, ids, own = render(layout, return_ids=True)
    vis = visible_pixels(ids, 2)
    assert vis[0] == own[0]          # nothing covers the near object
    assert 0 < vis[1] < own[1]       # the far one is partly hidden


def test_label_schema_matches_config():
    s = label_schema(ScenesConfig(max_objects=7, min_objects=2, depth_bins=4))
    assert s["count"]["num_classes"] == 8 and s["depth"]["num_classes"] == 4 and s["cls"]["names"] == list(SHAPES)
