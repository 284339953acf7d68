"""Tests for data.shapes_scene: palette, sizes, spec serialisation and aliased rendering."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.shapes_scene import COLORS, Relation, SceneSpec, ShapeObject, render_scene, shape_mask, size_px


def test_sizes_are_odd_fractions_of_the_canvas():
    assert (size_px("small", 32), size_px("large", 32)) == (9, 13)
    assert (size_px("small", 64), size_px("large", 64)) == (17, 27)
    for resolution in (16, 32, 48, 64, 128, 256):
        assert size_px("small", resolution) % 2 == 1 and size_px("large", resolution) % 2 == 1
        assert size_px("small", resolution) < size_px("large", resolution) < resolution


def test_render_uses_exact_palette_and_fills_the_box():
    objects = [
        ShapeObject("square", "red", "small", (1, 1, 10, 10)),
        ShapeObject("circle", "cyan", "large", (15, 2, 28, 15)),
        ShapeObject("triangle", "orange", "large", (3, 17, 16, 30)),
    ]
    pixels = np.asarray(render_scene(SceneSpec(objects, 32)))
    colors = {tuple(c) for c in pixels.reshape(-1, 3)}
    assert colors == {(0, 0, 0), COLORS["red"], COLORS["cyan"], COLORS["orange"]}
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        inside = np.all(pixels == COLORS[obj.color], axis=-1)
        ys, xs = np.nonzero(inside)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.box  # touches all four box edges
        assert np.array_equal(inside[y0:y1, x0:x1], shape_mask(obj.shape, x1 - x0, y1 - y0))


def test_shape_masks_have_the_expected_fill_ratios():
    for side in (9, 13, 17, 27):
        assert shape_mask("square", side, side).mean() == 1.0
        assert 0.72 < shape_mask("circle", side, side).mean() < 0.82
        assert 0.48 < shape_mask("triangle", side, side).mean() < 0.58
        tri = shape_mask("triangle", side, side)
        assert np.array_equal(tri, tri[:, ::-1])  # symmetric apex


def test_spec_round_trips_through_json():
    spec = SceneSpec(
        [
            ShapeObject("circle", "blue", "small", (0, 0, 9, 9)),
            ShapeObject("square", "white", "large", (12, 12, 25, 25)),
        ],
        32,
        "position",
        Relation(0, "above", 1),
        "a blue circle above a white square",
    )
    again = SceneSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


def test_invalid_objects_are_rejected():
    with pytest.raises(ValueError, match="unknown color"):
        ShapeObject("circle", "magenta", "small", (0, 0, 9, 9))
    with pytest.raises(ValueError, match="unknown shape"):
        ShapeObject("hexagon", "red", "small", (0, 0, 9, 9))
    with pytest.raises(ValueError, match="unknown relation"):
        Relation(0, "behind", 1)
