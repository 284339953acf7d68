"""Tests for data.digits_classifier: accuracy on real held-out digits, inputs, prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data.digits import DIGIT_WORDS, TEMPLATES, generate_digits
from data.digits_classifier import NO_DIGIT, DigitsClassifier, digit_prompts


@pytest.fixture(scope="module")
def classifier() -> DigitsClassifier:
    return DigitsClassifier.fit(32)


def _uint8(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)


def test_accurate_on_real_held_out_digits(classifier):
    assert classifier.test_accuracy >= 0.95
    # the shifted repeats of the test split (second pass) are held out too
    samples = list(generate_digits(2 * 359, 32, seed=3, split="test"))[359:]
    predicted = classifier.predict([s.image for s in samples])
    assert np.mean(predicted == [s.meta["label"] for s in samples]) >= 0.95


def test_fit_is_cached_per_resolution(classifier):
    assert DigitsClassifier.fit(32) is classifier
    assert DigitsClassifier.fit(32, seed=0) is classifier


def test_tensor_and_pil_inputs_agree(classifier):
    samples = list(generate_digits(40, 32, seed=1, split="test"))
    images = [s.image for s in samples]
    from_pil = classifier.predict(images)
    from_tensor = classifier.predict(_uint8(images))
    assert from_pil.dtype == np.int64 and np.array_equal(from_pil, from_tensor)
    assert classifier.predict([]).shape == (0,)
    with pytest.raises(ValueError):
        classifier.predict(_uint8(images).float())


def test_blank_images_are_no_digit(classifier):
    blank = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    assert (classifier.predict(blank) == NO_DIGIT).all()


def test_digit_prompts_use_training_templates():
    prompts = digit_prompts(6, seed=0)
    assert len(prompts) == 60 and [label for _, label in prompts].count(7) == 6
    templates = {t.format(word=w) for t in TEMPLATES for w in DIGIT_WORDS}
    for caption, label in prompts:
        assert caption in templates
        assert [w for w in caption.split() if w in DIGIT_WORDS] == [DIGIT_WORDS[label]]
    assert digit_prompts(6, seed=0) == prompts and digit_prompts(6, seed=1) != prompts
    with pytest.raises(ValueError):
        digit_prompts(0)
