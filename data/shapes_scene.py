"""The shapes world: palette, object and scene specs, and aliased rendering with PIL.

Conventions (shared by the generator, the captions and the judge):

* black background; object colours come only from `COLORS`; no anti-aliasing, so a rendered
  scene contains exactly black plus palette colours;
* boxes are integer pixel coordinates `(x0, y0, x1, y1)` of the scene's own resolution,
  half-open like numpy slices: the object covers columns x0..x1-1 and rows y0..y1-1;
* sizes are fractions of the canvas (`SIZE_FRACTIONS`), rounded to an odd pixel count so
  circles and triangles are symmetric: at 32 px small = 9 px and large = 13 px, at 64 px
  small = 17 px and large = 27 px;
* a triangle is isosceles and points up, with its base on the bottom row of its box.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
    "orange": (240, 140, 30),
    "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
SIZE_FRACTIONS: dict[str, float] = {"small": 0.27, "large": 0.42}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
KINDS: tuple[str, ...] = ("single", "two_objects", "position", "count")


def size_px(size: str, resolution: int) -> int:
    """Side length in pixels of a `size` object on a `resolution` canvas (odd, at least 3)."""
    side = round(SIZE_FRACTIONS[size] * resolution)
    if side % 2 == 0:
        side += 1
    return max(3, side)


@dataclass(frozen=True)
class ShapeObject:
    """One object: `box` is (x0, y0, x1, y1) in pixels of the scene resolution, half-open."""

    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; choose one of {tuple(COLORS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose one of {SIZES}")

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "box": list(self.box)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShapeObject:
        return cls(shape=d["shape"], color=d["color"], size=d["size"], box=tuple(int(v) for v in d["box"]))


@dataclass(frozen=True)
class Relation:
    """`objects[subject]` is `relation` (one of RELATIONS) `objects[reference]`."""

    subject: int
    relation: str
    reference: int

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; choose one of {RELATIONS}")


@dataclass
class SceneSpec:
    """A scene: its objects, canvas resolution, judge category, relation and caption."""

    objects: list[ShapeObject]
    resolution: int
    kind: str = "single"
    relation: Relation | None = None
    caption: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "objects": [o.to_dict() for o in self.objects],
            "resolution": self.resolution,
            "kind": self.kind,
            "caption": self.caption,
        }
        if self.relation is not None:
            d["relation"] = [self.relation.subject, self.relation.relation, self.relation.reference]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneSpec:
        rel = d.get("relation")
        return cls(
            objects=[ShapeObject.from_dict(o) for o in d["objects"]],
            resolution=int(d["resolution"]),
            kind=d.get("kind", "single"),
            relation=Relation(int(rel[0]), rel[1], int(rel[2])) if rel else None,
            caption=d.get("caption", ""),
        )


@lru_cache(maxsize=4096)
def _shape_mask_cached(shape: str, width: int, height: int) -> bytes:
    canvas = Image.new("L", (width, height), 0)
    _draw(ImageDraw.Draw(canvas), shape, (0, 0, width, height), 255)
    return canvas.tobytes()


def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of `shape` drawn to fill a width x height box."""
    raw = _shape_mask_cached(shape, int(width), int(height))
    return np.frombuffer(raw, dtype=np.uint8).reshape(height, width) > 0


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: Any) -> None:
    x0, y0, x1, y1 = box
    right, bottom = x1 - 1, y1 - 1
    if shape == "square":
        draw.rectangle([x0, y0, right, bottom], fill=fill)
    elif shape == "circle":
        draw.ellipse([x0, y0, right, bottom], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, bottom), (right, bottom), ((x0 + right) / 2, y0)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(spec: SceneSpec) -> Image.Image:
    """Draw the scene at `spec.resolution` with ImageDraw (aliased: no smoothing of edges)."""
    img = Image.new("RGB", (spec.resolution, spec.resolution), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for obj in spec.objects:
        _draw(draw, obj.shape, obj.box, COLORS[obj.color])
    return img
