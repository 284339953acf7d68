"""Tests for data.shapes_captions: writing and parsing captions."""

from __future__ import annotations

import pytest

from data.shapes_captions import ObjectRequirement, Requirements, object_phrase, parse_caption


def test_object_phrases():
    assert object_phrase("orange", "circle") == "an orange circle"
    assert object_phrase("red", "square", size="small") == "a small red square"
    assert object_phrase("green", "triangle", count=3) == "three green triangles"


@pytest.mark.parametrize(
    ("caption", "objects", "relation", "kind"),
    [
        ("a red circle", [("red", "circle", 1, None)], None, "single"),
        ("a picture of a small blue square", [("blue", "square", 1, "small")], None, "single"),
        ("one white triangle on a black background", [("white", "triangle", 1, None)], None, "single"),
        ("two red squares", [("red", "square", 2, None)], None, "count"),
        ("a picture of three large green triangles", [("green", "triangle", 3, "large")], None, "count"),
        (
            "a purple triangle and an orange circle",
            [("purple", "triangle", 1, None), ("orange", "circle", 1, None)],
            None,
            "two_objects",
        ),
        (
            "a blue circle is to the left of a yellow triangle",
            [("blue", "circle", 1, None), ("yellow", "triangle", 1, None)],
            "left of",
            "position",
        ),
        (
            "A White Square above a cyan circle.",
            [("white", "square", 1, None), ("cyan", "circle", 1, None)],
            "above",
            "position",
        ),
        (
            "a red circle below a red square",
            [("red", "circle", 1, None), ("red", "square", 1, None)],
            "below",
            "position",
        ),
        (
            "a small red circle right of a large blue circle",
            [("red", "circle", 1, "small"), ("blue", "circle", 1, "large")],
            "right of",
            "position",
        ),
    ],
)
def test_parse_caption(caption, objects, relation, kind):
    req = parse_caption(caption)
    assert req == Requirements(tuple(ObjectRequirement(*o) for o in objects), relation)
    assert req.kind == kind


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "a photo of a cat",
        "a circle",  # no colour
        "red circles",  # no count
        "two red circle",  # count and plural disagree
        "left of a red circle",  # relation without a subject
        "a red circle and a red circle",  # ambiguous
    ],
)
def test_unparseable_captions_raise(caption):
    with pytest.raises(ValueError):
        parse_caption(caption)
