"""Automatic judge: does a generated image show what a shapes caption asks for?

Detection (all thresholds are relative to the image size, so any resolution works):

1. Every pixel is classified as the nearest of black + the 8 palette colours (Euclidean RGB).
   A pixel farther than `color_tolerance` from all of them is left unclassified; black pixels
   are background. Nearest-colour classification with a tolerance, not equality, so that noisy
   generated images still work.
2. Per palette colour, 8-connected components are found, their holes filled (noise pixels of
   another colour inside an object), and components smaller than `min_area` (a fraction of the
   canvas) are dropped as specks.
3. A component's shape is the template (circle, square, triangle drawn exactly like the
   renderer does, at the component's bounding-box size) with the highest IoU with its mask;
   "unknown" when that IoU is below `min_iou` or the box is far from square (aspect > 1.5).
   On real renders the right template has IoU 1; the runner-up is circle vs square ~0.78.
4. Size is "small" or "large" by the box side relative to the canvas (threshold between the
   two size fractions); position is the mask centroid, normalised to [0, 1].

Rules (each a boolean of `JudgeResult`):

* `color_ok`: the set of detected colours equals the set of colours the caption names;
* `shape_ok`: the set of detected shapes equals the set of shapes the caption names;
* `count_ok`: the detected (colour, shape) multiset equals the caption's, so every object has
  its exact count and there are no extra objects;
* `size_ok`: every object whose size the caption names is detected at that size (True when
  no size is named);
* `position_ok`: for "A left of B" some detected A and B satisfy centroid(B).x - centroid(A).x
  >= `relation_margin` (likewise right of / above / below with y growing downwards); True when
  the caption has no relation;
* `correct`: all of the above. For the "color" category only `color_ok` counts
  (`JudgeResult.score`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from scipy import ndimage

from data.images import tensor_to_pil, to_rgb
from data.shapes_captions import Requirements, parse_caption, requirements_from_spec
from data.shapes_scene import COLORS, SHAPES, SIZE_FRACTIONS, SceneSpec, shape_mask

if TYPE_CHECKING:
    import torch

_PALETTE_NAMES = ("black", *COLORS)
_PALETTE = np.array([(0, 0, 0), *COLORS.values()], dtype=np.float32)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_SIZE_THRESHOLD = float(np.sqrt(SIZE_FRACTIONS["small"] * SIZE_FRACTIONS["large"]))


@dataclass(frozen=True)
class JudgeConfig:
    """Detection thresholds; the defaults are tuned on real renders at 32 and 64 px."""

    color_tolerance: float = 80.0
    min_area: float = 0.012
    min_iou: float = 0.6
    max_aspect: float = 1.5
    relation_margin: float = 0.1


@dataclass(frozen=True)
class DetectedObject:
    """A detected object; `box` is half-open pixels, `centroid` (x, y) normalised to [0, 1]."""

    color: str
    shape: str
    size: str
    area: int
    box: tuple[int, int, int, int]
    centroid: tuple[float, float]
    iou: float


@dataclass
class JudgeResult:
    """Per-requirement verdicts of one image against one caption (see the module docstring)."""

    color_ok: bool
    shape_ok: bool
    count_ok: bool
    size_ok: bool
    position_ok: bool
    kind: str
    requirements: Requirements
    detected: list[DetectedObject] = field(default_factory=list)

    @property
    def correct(self) -> bool:
        return self.color_ok and self.shape_ok and self.count_ok and self.size_ok and self.position_ok

    def score(self, category: str | None = None) -> bool:
        """Verdict for a judge category: "color" checks colour only, the others everything."""
        return self.color_ok if (category or self.kind) == "color" else self.correct


def _as_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(image, (Image.Image, np.ndarray)):
        return np.asarray(to_rgb(image), dtype=np.float32)
    return np.asarray(tensor_to_pil(image), dtype=np.float32)


def detect_objects(
    image: Image.Image | np.ndarray | torch.Tensor, config: JudgeConfig | None = None
) -> list[DetectedObject]:
    """Find the palette-coloured objects of an image (RGB PIL/array, or a (3,H,W) tensor in [-1,1])."""
    config = config or JudgeConfig()
    pixels = _as_array(image)
    height, width = pixels.shape[:2]
    dist2 = ((pixels[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(axis=-1)
    classes = dist2.argmin(axis=-1)
    classes[dist2.min(axis=-1) > config.color_tolerance**2] = -1
    min_area = config.min_area * width * height
    found: list[DetectedObject] = []
    for index in np.unique(classes):
        if index <= 0:
            continue
        labels, count = ndimage.label(classes == index, structure=_EIGHT_CONNECTED)
        for region, slices in enumerate(ndimage.find_objects(labels), start=1):
            mask = ndimage.binary_fill_holes(labels[slices] == region)
            area = int(mask.sum())
            if area < min_area:
                continue
            found.append(_describe(_PALETTE_NAMES[index], mask, slices, width, height, config))
    return found


def _describe(
    color: str, mask: np.ndarray, slices: tuple[slice, slice], width: int, height: int, config: JudgeConfig
) -> DetectedObject:
    box_h, box_w = mask.shape
    ious = {}
    for shape in SHAPES:
        template = shape_mask(shape, box_w, box_h)
        ious[shape] = float((template & mask).sum() / (template | mask).sum())
    best = max(ious, key=ious.get)
    aspect = max(box_w, box_h) / min(box_w, box_h)
    shape = best if ious[best] >= config.min_iou and aspect <= config.max_aspect else "unknown"
    size = "small" if max(box_w / width, box_h / height) < _SIZE_THRESHOLD else "large"
    ys, xs = np.nonzero(mask)
    top, left = slices[0].start, slices[1].start
    centroid = ((left + xs.mean() + 0.5) / width, (top + ys.mean() + 0.5) / height)
    box = (left, top, left + box_w, top + box_h)
    return DetectedObject(color, shape, size, int(mask.sum()), box, centroid, ious[best])


def _relation_holds(a: DetectedObject, b: DetectedObject, relation: str, margin: float) -> bool:
    dx = b.centroid[0] - a.centroid[0]
    dy = b.centroid[1] - a.centroid[1]
    return {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation] >= margin


def judge(
    image: Image.Image | np.ndarray | torch.Tensor,
    target: SceneSpec | str,
    config: JudgeConfig | None = None,
) -> JudgeResult:
    """Judge one image against a SceneSpec or a caption string (rules in the module docstring)."""
    config = config or JudgeConfig()
    if isinstance(target, SceneSpec):
        req, kind = requirements_from_spec(target), target.kind
    else:
        req = parse_caption(target)
        kind = req.kind
    found = detect_objects(image, config)

    color_ok = {d.color for d in found} == {o.color for o in req.objects}
    shape_ok = {d.shape for d in found} == {o.shape for o in req.objects}
    wanted = Counter({(o.color, o.shape): o.count for o in req.objects})
    count_ok = Counter((d.color, d.shape) for d in found) == wanted

    def matches(o) -> list[DetectedObject]:
        return [d for d in found if (d.color, d.shape) == (o.color, o.shape)]

    size_ok = all(
        matches(o) and all(d.size == o.size for d in matches(o)) for o in req.objects if o.size is not None
    )
    position_ok = True
    if req.relation is not None:
        subjects, references = matches(req.objects[0]), matches(req.objects[1])
        position_ok = any(
            _relation_holds(a, b, req.relation, config.relation_margin) for a in subjects for b in references
        )
    return JudgeResult(color_ok, shape_ok, count_ok, size_ok, position_ok, kind, req, found)


def judge_batch(
    images: Sequence[Image.Image | np.ndarray | torch.Tensor],
    targets: Sequence[SceneSpec | str],
    categories: Sequence[str] | None = None,
    config: JudgeConfig | None = None,
) -> dict[str, float]:
    """Accuracy per category, plus "overall" = the mean over categories (GenEval style).

    A sample's category is `categories[i]` if given, else the spec's `kind`, else the kind
    implied by the caption.
    """
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    if categories is not None and len(categories) != len(images):
        raise ValueError(f"{len(images)} images but {len(categories)} categories")
    hits: dict[str, list[bool]] = {}
    for i, (image, target) in enumerate(zip(images, targets)):
        result = judge(image, target, config)
        category = categories[i] if categories is not None else result.kind
        hits.setdefault(category, []).append(result.score(category))
    accuracy = {category: float(np.mean(v)) for category, v in sorted(hits.items())}
    if accuracy:
        accuracy["overall"] = float(np.mean(list(accuracy.values())))
    return accuracy
