"""Tests for data.digits: rendering, determinism, the fixed train/test split, captions."""

from __future__ import annotations

import numpy as np
import pytest

from data.digits import DIGIT_WORDS, generate_digits, render_digit, split_indices


def test_split_is_fixed_disjoint_and_complete():
    train, test = split_indices("train"), split_indices("test")
    assert len(train) + len(test) == 1797
    assert len(set(train) & set(test)) == 0
    assert abs(len(test) / 1797 - 0.2) < 0.01
    assert np.array_equal(train, split_indices("train"))
    with pytest.raises(ValueError):
        split_indices("val")


def test_samples_shape_range_and_labels():
    from sklearn.datasets import load_digits

    targets = load_digits().target
    samples = list(generate_digits(100, resolution=32, seed=0))
    for s in samples:
        pixels = np.asarray(s.image)
        assert s.image.mode == "RGB" and pixels.shape == (32, 32, 3)
        assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(
            pixels[..., 0], pixels[..., 2]
        )
        assert (
            pixels.max() > 150 and pixels[0].max() == 0 and pixels[:, 0].max() == 0
        )  # bright digit, black border
        assert targets[s.meta["index"]] == s.meta["label"]
        assert DIGIT_WORDS[s.meta["label"]] in s.caption.split()
    assert len({s.meta["label"] for s in samples}) == 10
    assert list(generate_digits(3, resolution=64))[0].image.size == (64, 64)


def test_deterministic_and_seed_dependent():
    a = list(generate_digits(20, seed=1))
    b = list(generate_digits(20, seed=1))
    c = list(generate_digits(20, seed=2))
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [s.meta for s in a] != [s.meta for s in c]


def test_train_and_test_samples_use_disjoint_digits():
    train = {s.meta["index"] for s in generate_digits(300, seed=0, split="train")}
    test = {s.meta["index"] for s in generate_digits(300, seed=0, split="test")}
    assert train <= set(split_indices("train").tolist())
    assert test <= set(split_indices("test").tolist())
    assert not train & test


def test_cycling_beyond_the_split_shifts_repeats():
    n_test = len(split_indices("test"))
    samples = list(generate_digits(2 * n_test, seed=0, split="test"))
    first = {s.meta["index"]: np.asarray(s.image) for s in samples[:n_test]}
    assert len(first) == n_test  # the first pass shows every test digit once
    for s in samples[n_test : n_test + 30]:
        original = first[s.meta["index"]]
        repeat = np.asarray(s.image)
        assert not np.array_equal(original, repeat)
        # the repeat is the original moved by 1-2 px along each axis (the black border absorbs it)
        assert any(
            np.array_equal(np.roll(original, (dy, dx), axis=(0, 1)), repeat)
            for dy in (-2, -1, 1, 2)
            for dx in (-2, -1, 1, 2)
        )


def test_render_digit_scales_values():
    full = render_digit(np.full((8, 8), 16.0), 32)
    assert np.asarray(full)[16, 16].tolist() == [255, 255, 255]
    assert np.asarray(render_digit(np.zeros((8, 8)), 32)).max() == 0
