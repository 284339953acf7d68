"""Captions of shapes scenes: writing them from a `SceneSpec` and parsing them back.

The grammar is small on purpose, so every caption the generator writes can be parsed back into
exactly the requirements the judge checks:

    object   := count [size] color shape      e.g. "a red circle", "an orange square",
                                                   "a small blue square", "three green triangles"
    caption  := object
              | object "and" object            "a purple triangle and an orange circle"
              | object relation object         "a blue circle left of a yellow triangle"
    relation := "left of" | "to the left of" | "right of" | "to the right of" | "above" | "below"

Counts are "a"/"an"/"one"/"two"/"three"; other words ("a picture of", "on a black
background", "is") are ignored by the parser.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from data.shapes_scene import COLORS, SHAPES, SceneSpec

COUNT_WORDS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
NUMBER_NAMES: dict[int, str] = {1: "one", 2: "two", 3: "three"}
SIZE_WORDS: dict[str, str] = {"small": "small", "tiny": "small", "large": "large", "big": "large"}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below",),
}

SINGLE_TEMPLATES = ("{obj}", "{obj}", "a picture of {obj}", "{obj} on a black background")
PAIR_TEMPLATES = ("{a} and {b}", "{a} and {b}", "a picture of {a} and {b}")
POSITION_TEMPLATES = ("{a} {rel} {b}", "{a} {rel} {b}", "{a} is {rel} {b}")
COUNT_TEMPLATES = ("{obj}", "{obj}", "a picture of {obj}")


@dataclass(frozen=True)
class ObjectRequirement:
    """`count` objects of this colour and shape; `size` is None when the caption does not say."""

    color: str
    shape: str
    count: int = 1
    size: str | None = None


@dataclass(frozen=True)
class Requirements:
    """What a caption asks for; `relation` relates objects[0] (subject) to objects[1]."""

    objects: tuple[ObjectRequirement, ...]
    relation: str | None = None

    @property
    def kind(self) -> str:
        """Judge category implied by the caption (captions alone cannot express "color")."""
        if self.relation is not None:
            return "position"
        if any(o.count > 1 for o in self.objects):
            return "count"
        if len(self.objects) > 1:
            return "two_objects"
        return "single"


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def object_phrase(color: str, shape: str, count: int = 1, size: str | None = None) -> str:
    """English noun phrase, e.g. "an orange circle", "a small red square", "two blue triangles"."""
    words = ([size] if size else []) + [color, shape + ("s" if count > 1 else "")]
    head = _article(words[0]) if count == 1 else NUMBER_NAMES[count]
    return " ".join([head, *words])


def requirements_from_spec(spec: SceneSpec) -> Requirements:
    """Requirements of a scene: its caption if it has one, else its objects (sizes not required)."""
    if spec.caption:
        return parse_caption(spec.caption)
    counts = Counter((o.color, o.shape) for o in spec.objects)
    order = list(dict.fromkeys((o.color, o.shape) for o in spec.objects))
    if spec.relation is not None:
        subject = spec.objects[spec.relation.subject]
        reference = spec.objects[spec.relation.reference]
        order = [(subject.color, subject.shape), (reference.color, reference.shape)]
    objects = tuple(ObjectRequirement(c, s, counts[(c, s)]) for c, s in order)
    return Requirements(objects, spec.relation.relation if spec.relation else None)


def caption_for_scene(spec: SceneSpec, rng: np.random.Generator, size_probability: float = 0.4) -> str:
    """Write a caption that is true of `spec`, using a random template for its kind.

    Each object's size is named with probability `size_probability`; the judge then checks it.
    """

    def phrase(index: int, count: int = 1) -> str:
        obj = spec.objects[index]
        size = obj.size if rng.random() < size_probability else None
        return object_phrase(obj.color, obj.shape, count, size)

    def pick(templates: tuple[str, ...]) -> str:
        return templates[int(rng.integers(len(templates)))]

    kind = spec.kind
    if kind in ("single", "color"):
        return pick(SINGLE_TEMPLATES).format(obj=phrase(0))
    if kind == "two_objects":
        return pick(PAIR_TEMPLATES).format(a=phrase(0), b=phrase(1))
    if kind == "position":
        if spec.relation is None:
            raise ValueError("a position scene needs a relation")
        phrases = RELATION_PHRASES[spec.relation.relation]
        rel = phrases[int(rng.integers(len(phrases)))]
        return pick(POSITION_TEMPLATES).format(
            a=phrase(spec.relation.subject), rel=rel, b=phrase(spec.relation.reference)
        )
    if kind == "count":
        sizes = {o.size for o in spec.objects}
        shared_size = sizes.pop() if len(sizes) == 1 and rng.random() < size_probability else None
        first = spec.objects[0]
        obj = object_phrase(first.color, first.shape, len(spec.objects), shared_size)
        return pick(COUNT_TEMPLATES).format(obj=obj)
    raise ValueError(f"unknown scene kind {kind!r}")


def parse_caption(caption: str) -> Requirements:
    """Parse a caption of the grammar above into `Requirements`; raises ValueError otherwise."""
    words = "".join(ch if ch.isalpha() else " " for ch in caption.lower()).split()
    objects: list[ObjectRequirement] = []
    relation: str | None = None
    relation_after = -1
    count: int | None = None
    size: str | None = None
    color: str | None = None
    i = 0
    while i < len(words):
        word = words[i]
        if word in COUNT_WORDS:
            count, size, color = COUNT_WORDS[word], None, None
        elif word in SIZE_WORDS:
            size = SIZE_WORDS[word]
        elif word in COLORS:
            color = word
        elif word.rstrip("s") in SHAPES:
            shape = word.rstrip("s")
            if color is None:
                raise ValueError(f"caption {caption!r}: no colour before {word!r}")
            plural = word.endswith("s")
            if count is None:
                raise ValueError(f"caption {caption!r}: no count word before {word!r}")
            if plural != (count > 1):
                raise ValueError(f"caption {caption!r}: count and plural of {word!r} disagree")
            objects.append(ObjectRequirement(color, shape, count, size))
            count, size, color = None, None, None
        elif word in ("left", "right") and i + 1 < len(words) and words[i + 1] == "of":
            relation, relation_after = f"{word} of", len(objects)
            i += 1
        elif word in ("above", "below"):
            relation, relation_after = word, len(objects)
        i += 1
    if not objects:
        raise ValueError(f"caption {caption!r}: no '<count> <color> <shape>' object found")
    if relation is not None and (len(objects) != 2 or relation_after != 1):
        raise ValueError(f"caption {caption!r}: a relation needs exactly one object on each side")
    if len({(o.color, o.shape) for o in objects}) != len(objects):
        raise ValueError(f"caption {caption!r}: the same colour and shape is named twice")
    return Requirements(tuple(objects), relation)
