"""Tests for the shapes judge: accuracy on real renders, robustness to noise, rejection of mismatches."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data.images import pil_to_tensor
from data.shapes import (
    COLORS,
    SHAPES,
    JudgeResult,
    SceneSpec,
    eval_prompts,
    generate_shapes,
    judge,
    judge_batch,
    object_phrase,
    parse_caption,
    render_scene,
)

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _scenes(resolution: int, n: int = 500, seed: int = 11):
    samples = list(generate_shapes(n, resolution, seed=seed))
    return samples, [SceneSpec.from_dict(s.meta) for s in samples]


@pytest.mark.parametrize("resolution", [32, 64])
def test_judge_is_right_on_real_renders(resolution):
    samples, specs = _scenes(resolution)
    by_spec = np.mean([judge(s.image, spec).correct for s, spec in zip(samples, specs)])
    by_caption = np.mean([judge(s.image, s.caption).correct for s in samples])
    assert by_spec >= 0.99 and by_caption >= 0.99, (by_spec, by_caption)


def test_judge_is_robust_to_mild_noise():
    samples, specs = _scenes(32, n=500, seed=12)
    rng = np.random.default_rng(0)
    hits = []
    for sample, spec in zip(samples, specs):
        noisy = np.asarray(sample.image) / 255.0 + rng.normal(0.0, 10 / 255, (32, 32, 3))
        hits.append(judge(np.clip(noisy, 0.0, 1.0), spec).correct)
    assert np.mean(hits) >= 0.95


def test_blank_image_is_wrong():
    for caption in ("a red circle", "two blue squares", "a cyan circle above a white triangle"):
        result = judge(Image.new("RGB", (32, 32)), caption)
        assert not result.correct and not result.color_ok and not result.count_ok
        assert result.detected == []


def _mutations(caption: str) -> list[str]:
    """Captions that differ from `caption` in exactly one judged property."""
    req = parse_caption(caption)
    first, rest = req.objects[0], req.objects[1:]
    used_colors = {o.color for o in req.objects}
    used_shapes = {o.shape for o in req.objects}
    new_color = next(c for c in COLORS if c not in used_colors)
    new_shape = next((s for s in SHAPES if s not in used_shapes), None)

    def write(objects, relation=req.relation):
        phrases = [object_phrase(o.color, o.shape, o.count, o.size) for o in objects]
        return f"{phrases[0]} {relation} {phrases[1]}" if relation else " and ".join(phrases)

    def replace(o, **changes):
        fields = {"color": o.color, "shape": o.shape, "count": o.count, "size": o.size, **changes}
        return type(o)(**fields)

    out = [write([replace(first, color=new_color), *rest])]
    if new_shape is not None:
        out.append(write([replace(first, shape=new_shape), *rest]))
    if first.count in (1, 2):
        out.append(write([replace(first, count=first.count + 1), *rest]))
    if req.relation is not None:
        out.append(write(list(req.objects), OPPOSITE[req.relation]))
    if first.size is not None:
        out.append(write([replace(first, size="large" if first.size == "small" else "small"), *rest]))
    return out


def test_mismatched_captions_are_rejected():
    samples, _ = _scenes(32, n=200, seed=13)
    checked = 0
    for sample in samples:
        for wrong in _mutations(sample.caption):
            assert not judge(sample.image, wrong).correct, (sample.caption, wrong)
            checked += 1
    assert checked > 400
    # another scene's caption is almost never right
    others = [judge(samples[i].image, samples[(i + 1) % 200].caption).correct for i in range(200)]
    assert np.mean(others) <= 0.05


def test_per_requirement_verdicts():
    spec = SceneSpec.from_dict(
        {
            "objects": [
                {"shape": "circle", "color": "red", "size": "large", "box": [2, 2, 15, 15]},
                {"shape": "square", "color": "blue", "size": "small", "box": [20, 20, 29, 29]},
            ],
            "resolution": 32,
            "kind": "position",
            "relation": [0, "left of", 1],
        }
    )
    image = render_scene(spec)
    assert judge(image, spec).correct
    assert judge(image, "a red circle left of a blue square").correct
    assert judge(image, "a red circle above a blue square").correct  # also true: it is up-left
    wrong_rel = judge(image, "a red circle right of a blue square")
    assert (wrong_rel.color_ok, wrong_rel.shape_ok, wrong_rel.count_ok, wrong_rel.position_ok) == (
        True,
        True,
        True,
        False,
    )
    wrong_binding = judge(image, "a blue circle and a red square")
    assert wrong_binding.color_ok and wrong_binding.shape_ok and not wrong_binding.count_ok
    wrong_size = judge(image, "a small red circle and a blue square")
    assert not wrong_size.size_ok and not wrong_size.correct
    only_color = judge(image, "a red triangle and a blue triangle")
    assert only_color.color_ok and not only_color.shape_ok
    assert only_color.score("color") and not only_color.score("two_objects")


def test_judge_accepts_tensors_and_other_resolutions():
    spec = SceneSpec.from_dict(next(generate_shapes(1, 32, seed=5)).meta)
    image = render_scene(spec)
    assert judge(pil_to_tensor(image), spec).correct
    assert judge(image.resize((96, 96), Image.Resampling.NEAREST), spec).correct


def test_judge_batch_per_category():
    images, targets = [], []
    for category in ("single", "color", "two_objects", "position", "count"):
        for _, spec in eval_prompts(category, 20, seed=1):
            images.append(render_scene(spec))
            targets.append(spec)
    accuracy = judge_batch(images, targets)
    assert set(accuracy) == {"single", "color", "two_objects", "position", "count", "overall"}
    assert all(v == 1.0 for v in accuracy.values())
    blank = [Image.new("RGB", (32, 32))] * len(targets)
    assert all(v == 0.0 for v in judge_batch(blank, targets).values())
    captions = [t.caption for t in targets[:20]]
    assert judge_batch(images[:20], captions, categories=["color"] * 20) == {"color": 1.0, "overall": 1.0}
    with pytest.raises(ValueError):
        judge_batch(images[:2], targets[:3])
    assert isinstance(judge(images[0], targets[0]), JudgeResult)
