"""Procedural shapes scenes with true, judgeable captions.

A scene has 1-3 non-overlapping objects (circle/square/triangle, 8 palette colours, small or
large) on black, and belongs to one judge category (`kind`):

* "single": one object ("a red circle", "a small blue square");
* "two_objects": two objects with different colour/shape ("a purple triangle and an orange circle"),
  named in reading order (top to bottom, left to right within a band; see `_reading_order`);
* "position": two such objects and one relation ("a blue circle left of a yellow triangle");
* "count": 2 or 3 objects sharing colour, shape and size ("three green triangles").

Layout guarantees that make captions judgeable: boxes stay `margin` pixels apart (so objects
never touch, even diagonally), and a relation is only claimed when the two boxes are separated
along that axis by at least the margin; a scene may satisfy several relations (e.g. diagonal
placement) but its caption names one that is true.

Determinism: sample i depends only on (seed, split, i), so `generate_shapes(10)` is a prefix of
`generate_shapes(1000)`. Train, test and evaluation prompts use separate random streams.
The judge lives in `data.shapes_judge` and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from data.sample import Sample
from data.shapes_captions import (
    ObjectRequirement,
    Requirements,
    caption_for_scene,
    object_phrase,
    parse_caption,
    requirements_from_spec,
)
from data.shapes_judge import DetectedObject, JudgeConfig, JudgeResult, detect_objects, judge, judge_batch
from data.shapes_scene import (
    COLORS,
    KINDS,
    RELATIONS,
    SHAPES,
    SIZES,
    Relation,
    SceneSpec,
    ShapeObject,
    render_scene,
    shape_mask,
    size_px,
)

__all__ = [
    "COLORS",
    "EVAL_CATEGORIES",
    "KINDS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "DetectedObject",
    "JudgeConfig",
    "JudgeResult",
    "ObjectRequirement",
    "Relation",
    "Requirements",
    "SceneSpec",
    "ShapeObject",
    "caption_for_scene",
    "detect_objects",
    "eval_prompts",
    "generate_shapes",
    "judge",
    "judge_batch",
    "margin_px",
    "object_phrase",
    "parse_caption",
    "random_scene",
    "render_scene",
    "requirements_from_spec",
    "scene_for_caption",
    "shape_mask",
    "true_relations",
]

EVAL_CATEGORIES: tuple[str, ...] = ("single", "color", "two_objects", "position", "count")
_STREAMS = {"train": 0, "test": 1, "eval": 2}
_MAX_TRIES = 100

Box = tuple[int, int, int, int]


def margin_px(resolution: int) -> int:
    """Minimum gap between two objects' boxes (2 px at 32, 4 px at 64)."""
    return max(2, round(0.06 * resolution))


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAMS[stream], index]))


def true_relations(a: Box, b: Box, gap: int) -> list[str]:
    """Relations of box `a` to box `b` that hold with a clear gap (see the module docstring)."""
    found = []
    if a[2] + gap <= b[0]:
        found.append("left of")
    if b[2] + gap <= a[0]:
        found.append("right of")
    if a[3] + gap <= b[1]:
        found.append("above")
    if b[3] + gap <= a[1]:
        found.append("below")
    return found


def _place(
    sides: list[int], resolution: int, rng: np.random.Generator, relation: str | None = None
) -> list[Box]:
    """Random non-touching boxes of the given side lengths; box 0 is `relation` of box 1.

    Each box is drawn uniformly from all positions that keep the margin to the boxes already
    placed (and satisfy the relation for box 1), so tight layouts such as three large objects
    are found quickly; if a layout gets stuck it is restarted.
    """
    gap = margin_px(resolution)
    for _ in range(_MAX_TRIES):
        boxes: list[Box] = []
        for side in sides:
            if side > resolution:
                break
            grid = np.arange(resolution - side + 1)
            x0, y0 = (a.ravel() for a in np.meshgrid(grid, grid))
            x1, y1 = x0 + side, y0 + side
            valid = np.ones(x0.shape, dtype=bool)
            for bx0, by0, bx1, by1 in boxes:
                valid &= (x1 + gap <= bx0) | (bx1 + gap <= x0) | (y1 + gap <= by0) | (by1 + gap <= y0)
            if relation is not None and len(boxes) == 1:
                ax0, ay0, ax1, ay1 = boxes[0]
                valid &= {
                    "left of": ax1 + gap <= x0,
                    "right of": x1 + gap <= ax0,
                    "above": ay1 + gap <= y0,
                    "below": y1 + gap <= ay0,
                }[relation]
            candidates = np.flatnonzero(valid)
            if candidates.size == 0:
                break
            pick = int(candidates[rng.integers(candidates.size)])
            boxes.append((int(x0[pick]), int(y0[pick]), int(x1[pick]), int(y1[pick])))
        if len(boxes) == len(sides):
            return boxes
    raise ValueError(f"cannot place objects of sides {sides} on a {resolution} px canvas")


def _distinct_pairs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    colors, pairs = list(COLORS), []
    while len(pairs) < n:
        pair = (colors[int(rng.integers(len(colors)))], SHAPES[int(rng.integers(len(SHAPES)))])
        if pair not in pairs:
            pairs.append(pair)
    return pairs


READING_BANDS = 8  # rows of the canvas within which objects read left to right (8 = one row of an 8×8 grid)


def _reading_order(box: Box, resolution: int) -> tuple[int, int]:
    """Sort key putting objects in reading order: by the band of their top edge, then left to right.

    A two-object caption names its objects in this order, which is the order a raster-scan decoder
    draws them (its first token row holding each object's top edge), so the first phrase describes
    the first object drawn.
    """
    return box[1] * READING_BANDS // resolution, box[0]


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def random_scene(kind: str, resolution: int, rng: np.random.Generator) -> SceneSpec:
    """A random scene of one judge category ("color" is a "single" scene judged on colour)."""
    if kind in ("single", "color"):
        (color, shape), size = _distinct_pairs(rng, 1)[0], _pick(rng, SIZES)
        boxes = _place([size_px(size, resolution)], resolution, rng)
        return SceneSpec([ShapeObject(shape, color, size, boxes[0])], resolution, kind)
    if kind in ("two_objects", "position"):
        pairs = _distinct_pairs(rng, 2)
        sizes = [_pick(rng, SIZES), _pick(rng, SIZES)]
        relation = _pick(rng, RELATIONS) if kind == "position" else None
        boxes = _place([size_px(s, resolution) for s in sizes], resolution, rng, relation)
        objects = [
            ShapeObject(shape, color, size, box) for (color, shape), size, box in zip(pairs, sizes, boxes)
        ]
        if relation is None:
            objects.sort(key=lambda o: _reading_order(o.box, resolution))
        rel = Relation(0, relation, 1) if relation else None
        return SceneSpec(objects, resolution, kind, rel)
    if kind == "count":
        (color, shape), n = _distinct_pairs(rng, 1)[0], int(rng.integers(2, 4))
        size = _pick(rng, SIZES)
        try:
            boxes = _place([size_px(size, resolution)] * n, resolution, rng)
        except ValueError:
            size = "small"
            boxes = _place([size_px(size, resolution)] * n, resolution, rng)
        return SceneSpec([ShapeObject(shape, color, size, box) for box in boxes], resolution, kind)
    raise ValueError(f"unknown kind {kind!r}; choose one of {EVAL_CATEGORIES}")


def _captioned(kind: str, resolution: int, rng: np.random.Generator) -> SceneSpec:
    spec = random_scene(kind, resolution, rng)
    spec.caption = caption_for_scene(spec, rng, size_probability=0.0 if kind == "color" else 0.4)
    return spec


def generate_shapes(num: int, resolution: int = 32, seed: int = 0, split: str = "train") -> Iterator[Sample]:
    """`num` rendered scenes with captions; kinds are drawn uniformly; meta is the scene spec."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    for i in range(num):
        rng = _rng(seed, split, i)
        spec = _captioned(_pick(rng, KINDS), resolution, rng)
        yield Sample(f"shapes-{i:09d}", render_scene(spec), spec.caption, spec.to_dict())


def eval_prompts(category: str, n: int, seed: int = 0, resolution: int = 32) -> list[tuple[str, SceneSpec]]:
    """`n` evaluation prompts (caption, reference scene) of one category of EVAL_CATEGORIES.

    They come from a random stream separate from the train/test scenes, so the scenes are
    held out; captions of the small categories (there are 48 single objects) can of course
    also occur in training. The spec's `kind` is the category, which `judge_batch` uses.
    """
    if category not in EVAL_CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose one of {EVAL_CATEGORIES}")
    offset = EVAL_CATEGORIES.index(category) * 10_000_000
    prompts = []
    for i in range(n):
        spec = _captioned(category, resolution, _rng(seed, "eval", offset + i))
        prompts.append((spec.caption, spec))
    return prompts


def scene_for_caption(caption: str, resolution: int = 32, seed: int = 0) -> SceneSpec:
    """A scene that makes `caption` true (sizes not named in the caption are chosen at random)."""
    req = parse_caption(caption)
    rng = np.random.default_rng(seed)
    objects: list[tuple[ObjectRequirement, str]] = []
    for o in req.objects:
        size = o.size or _pick(rng, SIZES)
        objects.extend((o, size) for _ in range(o.count))
    sides = [size_px(size, resolution) for _, size in objects]
    if req.relation is not None:
        # the first object of the subject and of the reference carry the relation
        first_reference = req.objects[0].count
        order = [0, first_reference] + [i for i in range(len(objects)) if i not in (0, first_reference)]
        objects = [objects[i] for i in order]
        sides = [sides[i] for i in order]
    boxes = _place(sides, resolution, rng, req.relation)
    shapes = [ShapeObject(o.shape, o.color, size, box) for (o, size), box in zip(objects, boxes)]
    relation = Relation(0, req.relation, 1) if req.relation else None
    return SceneSpec(shapes, resolution, req.kind, relation, caption)
