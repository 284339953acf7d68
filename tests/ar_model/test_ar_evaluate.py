"""Tests for ar_model.evaluate: the evaluators separate an oracle generator from a useless one."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from ar_model.evaluate import (
    CaptionResult,
    DigitsResult,
    MMGeneratorLike,
    T2IResult,
    evaluate_captions,
    evaluate_digits,
    evaluate_text_to_image,
    main,
    names_digit,
    rule_breakdown,
    sample_grids,
)
from data.digits import DIGIT_WORDS, generate_digits
from data.digits_classifier import images_to_pil
from data.shapes import EVAL_CATEGORIES, generate_shapes, judge_batch, render_scene, scene_for_caption

RES = 32
N_CAPTIONS = 30


def _uint8(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


class OracleGenerator:
    """Renders the reference for every prompt and knows the true caption of every held-out image."""

    resolution = RES

    def __init__(self, label_shift: int = 0):
        self.label_shift = label_shift
        self.digits: dict[int, list[Image.Image]] = {}
        for s in generate_digits(359, RES, seed=5, split="test"):
            self.digits.setdefault(s.meta["label"], []).append(s.image)
        held_out = list(generate_shapes(N_CAPTIONS, RES, split="test"))
        held_out += generate_digits(N_CAPTIONS, RES, split="test")
        self.captions = {s.image.tobytes(): s.caption for s in held_out}

    def text_to_image(
        self,
        prompts,
        *,
        guidance_scale=3.0,
        cfg_schedule="constant",
        temperature=1.0,
        top_k=None,
        top_p=None,
        num_candidates=1,
        seed=0,
        batch_size=64,
    ):
        self.last_sampling = {"cfg_schedule": cfg_schedule, "num_candidates": num_candidates}
        images = []
        for i, prompt in enumerate(prompts):
            try:
                images.append(render_scene(scene_for_caption(prompt, RES, seed=seed + i)))
            except ValueError:  # not a shapes caption ("two" is a count word too): a digit prompt
                word = next(w for w in prompt.split() if w in DIGIT_WORDS)
                label = (DIGIT_WORDS.index(word) + self.label_shift) % 10
                images.append(self.digits[label][i % len(self.digits[label])])
        return _uint8(images)

    def image_to_text(self, images, *, max_new_tokens=32, batch_size=64):
        pils = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
        return [self.captions[im.tobytes()] for im in pils]


class BlankGenerator:
    resolution = RES

    def text_to_image(self, prompts, **sampling):
        return torch.zeros(len(prompts), 3, RES, RES, dtype=torch.uint8)

    def image_to_text(self, images, **kwargs):
        return [""] * len(images)


@pytest.fixture(scope="module")
def oracle() -> OracleGenerator:
    return OracleGenerator()


def test_generators_satisfy_the_protocol(oracle):
    assert isinstance(oracle, MMGeneratorLike) and isinstance(BlankGenerator(), MMGeneratorLike)


def test_text_to_image_oracle_scores_high_and_blank_low(oracle):
    result = evaluate_text_to_image(oracle, n_per_category=20, seed=1)
    assert set(result.scores) == {*EVAL_CATEGORIES, "overall"}
    assert all(v >= 0.95 for v in result.scores.values()), result.scores
    for c in EVAL_CATEGORIES:
        assert result.images[c].shape == (20, 3, RES, RES) and result.images[c].dtype == torch.uint8
        assert len(result.prompts[c]) == 20 and len(result.correct[c]) == 20
    blank = evaluate_text_to_image(BlankGenerator(), n_per_category=20, seed=1)
    assert all(v <= 0.05 for v in blank.scores.values()), blank.scores
    assert result.plain_scores == {} and blank.plain_scores == {}


def test_plain_scores_of_a_generator_without_candidates_come_from_a_second_pass(oracle):
    """A generator without ``text_to_token_candidates`` is sampled again with ``num_candidates`` 1."""
    result = evaluate_text_to_image(oracle, n_per_category=10, seed=1, plain=True, num_candidates=3)
    assert oracle.last_sampling["num_candidates"] == 1  # the plain pass came last
    assert result.plain_scores == result.scores  # the oracle ignores num_candidates
    digits = evaluate_digits(oracle, n_per_digit=2, seed=1, plain=True, num_candidates=3)
    assert digits.plain_accuracy == digits.accuracy and oracle.last_sampling["num_candidates"] == 1
    shifted = evaluate_digits(OracleGenerator(label_shift=1), n_per_digit=2, seed=1, plain=True)
    assert shifted.plain_accuracy == shifted.accuracy < 0.2  # num_candidates 1: the plain images are these


class FirstObjectGenerator:
    """Draws only the first object a shapes prompt names: every two-object image misses one."""

    resolution = RES

    def text_to_image(self, prompts, *, seed=0, **sampling):
        scenes = [scene_for_caption(p, RES, seed=seed + i) for i, p in enumerate(prompts)]
        for scene in scenes:
            scene.objects = scene.objects[:1]
        return _uint8([render_scene(s) for s in scenes])

    def image_to_text(self, images, **kwargs):
        return [""] * len(images)


def test_rule_breakdown_says_why_images_fail(oracle):
    good = evaluate_text_to_image(oracle, n_per_category=10, categories=["single", "count"], seed=3)
    assert good.rules["single"]["objects_1"] == 1.0
    assert good.rules["count"]["objects_2"] + good.rules["count"]["objects_3+"] == 1.0
    assert all(v == 0.0 for c in good.rules for k, v in good.rules[c].items() if k.startswith("fails_"))
    half = evaluate_text_to_image(
        FirstObjectGenerator(), n_per_category=10, categories=["two_objects"], seed=3
    )
    rules = half.rules["two_objects"]
    assert half.scores["two_objects"] == 0.0
    assert rules["objects_1"] == 1.0 and rules["fails_count"] == 1.0 and rules["fails_position"] == 0.0
    blank = evaluate_text_to_image(BlankGenerator(), n_per_category=5, categories=["single"], seed=3)
    assert blank.rules["single"]["objects_0"] == 1.0 and blank.rules["single"]["fails_color"] == 1.0
    assert rule_breakdown([]) == {k: 0.0 for k in rules}


def test_text_to_image_scores_agree_with_judge_batch(oracle):
    categories = ["count", "color"]
    result = evaluate_text_to_image(oracle, n_per_category=8, categories=categories, seed=2)
    images = images_to_pil(torch.cat([result.images[c] for c in categories]))
    targets = [p for c in categories for p in result.prompts[c]]
    assert judge_batch(images, targets, [c for c in categories for _ in range(8)]) == result.scores
    with pytest.raises(ValueError):
        evaluate_text_to_image(oracle, n_per_category=2, categories=["nonsense"])
    with pytest.raises(ValueError):
        evaluate_text_to_image(oracle, n_per_category=0)


def test_digits_oracle_scores_high_and_wrong_or_blank_low(oracle):
    result = evaluate_digits(oracle, n_per_digit=10, seed=0)
    assert result.accuracy >= 0.95 and min(result.per_digit.values()) >= 0.8
    assert result.classifier_test_accuracy >= 0.95
    assert result.images.shape == (100, 3, RES, RES) and len(result.prompts) == 100
    assert evaluate_digits(OracleGenerator(label_shift=1), n_per_digit=10).accuracy <= 0.05
    assert evaluate_digits(BlankGenerator(), n_per_digit=10).accuracy <= 0.05


def test_captions_oracle_scores_high_and_blank_low(oracle):
    result = evaluate_captions(oracle, n=N_CAPTIONS)
    assert result.shapes_accuracy >= 0.95 and result.digits_accuracy >= 0.95
    assert result.shapes_parse_rate == 1.0 and len(result.samples) == 2 * N_CAPTIONS
    blank = evaluate_captions(BlankGenerator(), n=N_CAPTIONS)
    assert blank.shapes_accuracy <= 0.05 and blank.digits_accuracy <= 0.05 and blank.shapes_parse_rate == 0


def test_names_digit_needs_exactly_the_right_word():
    assert names_digit("the digit seven", 7) and names_digit("A handwritten Seven.", 7)
    assert not names_digit("the digit seven", 1)
    assert not names_digit("zero one two three four five six seven eight nine", 7)
    assert not names_digit("", 0)


def test_wrong_image_count_is_an_error(oracle):
    class Short(BlankGenerator):
        def text_to_image(self, prompts, **sampling):
            return torch.zeros(len(prompts) - 1, 3, RES, RES, dtype=torch.uint8)

    with pytest.raises(ValueError, match="uint8"):
        evaluate_text_to_image(Short(), n_per_category=2)


def test_sample_grids(tmp_path, oracle):
    t2i = evaluate_text_to_image(oracle, n_per_category=12, categories=["single", "position"])
    digits = evaluate_digits(oracle, n_per_digit=3)
    captions = evaluate_captions(oracle, n=5)
    paths = {}
    for result in (t2i, digits, captions):
        paths.update(sample_grids(result, tmp_path, scale=4))
    assert set(paths) == {"t2i_single", "t2i_position", "digits", "captions_shapes", "captions_digits"}
    with Image.open(paths["t2i_single"]) as grid:  # 10 per row, 2 rows, 2 px padding, x4
        assert grid.size == ((10 * RES + 11 * 2) * 4, (2 * RES + 3 * 2) * 4)
    with Image.open(paths["digits"]) as grid:  # one row per digit, 3 per row
        assert grid.size == ((3 * RES + 4 * 2) * 4, (10 * RES + 11 * 2) * 4)
    assert len((tmp_path / "t2i_position.txt").read_text().splitlines()) == 12
    with pytest.raises(TypeError):
        sample_grids({"not": "a result"}, tmp_path)


def test_cli_writes_metrics_and_grids(tmp_path, monkeypatch, oracle, capsys):
    loaded = []

    class FakeMMGenerator:
        @classmethod
        def from_pretrained(cls, path):
            loaded.append(path)
            return oracle

    fake = types.ModuleType("ar_model.generator")
    fake.MMGenerator = FakeMMGenerator
    monkeypatch.setitem(sys.modules, "ar_model.generator", fake)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    out = tmp_path / "eval" / "metrics.json"
    argv = [
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--n_per_category",
        "4",
        "--n_digits_per_class",
        "2",
    ]
    metrics = main(
        [*argv, "--n_captions", "5", "--grids", str(tmp_path / "grids"), "--top_k", "5"]
        + ["--num_candidates", "3", "--cfg_schedule", "linear"]
    )
    assert oracle.last_sampling == {"cfg_schedule": "linear", "num_candidates": 3}  # passed to the generator
    assert metrics["sampling"]["num_candidates"] == 3 and metrics["sampling"]["cfg_schedule"] == "linear"
    assert loaded == [str(model_dir)]
    assert json.loads(out.read_text()) == metrics
    assert metrics["targets"]["single"]["met"] and metrics["targets"]["digits"]["met"]
    assert metrics["sampling"]["top_k"] == 5 and set(metrics["digits"]["per_digit"]) == set(DIGIT_WORDS)
    assert (tmp_path / "grids" / "t2i_count.png").is_file()
    assert "t2i single" in capsys.readouterr().out

    bad_args = (["--n_per_category", "0"], ["--temperature", "0"], ["--top_p", "1.5"], ["--top_k", "0"])
    for bad in (*bad_args, ["--num_candidates", "0"], ["--cfg_schedule", "cosine"]):
        with pytest.raises(SystemExit):
            main([*argv, *bad])
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "missing"), "--out", str(out)])
    assert loaded == [str(model_dir)]  # arguments are checked before the model is loaded


def test_results_are_dataclasses_of_the_documented_types(oracle):
    assert isinstance(evaluate_text_to_image(oracle, n_per_category=1), T2IResult)
    assert isinstance(evaluate_digits(oracle, n_per_digit=1), DigitsResult)
    assert isinstance(evaluate_captions(oracle, n=1), CaptionResult)
