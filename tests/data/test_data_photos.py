"""Tests for data.photos: offline loading of bundled photographs and deterministic crops."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from data.photos import PHOTO_NAMES, generate_photos, load_photo, photo_dir


def test_every_photo_loads_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    load_photo.cache_clear()
    assert len(PHOTO_NAMES) >= 8
    for name in PHOTO_NAMES:
        img = load_photo(name)
        assert img.mode == "RGB" and min(img.size) >= 256
        pixels = np.asarray(img, dtype=np.int16)
        assert np.abs(pixels[..., 0] - pixels[..., 1]).mean() > 2  # a colour photo, not gray
    assert photo_dir().is_dir()


def test_unknown_photo():
    with pytest.raises(ValueError, match="unknown photo"):
        load_photo("moon")


def test_crops_have_the_right_size_and_meta():
    samples = list(generate_photos(18, resolution=48, seed=0, crop_scale=(0.2, 0.5)))
    assert [s.meta["source"] for s in samples[: len(PHOTO_NAMES)]] == list(PHOTO_NAMES)
    for s in samples:
        assert s.image.mode == "RGB" and s.image.size == (48, 48)
        photo = load_photo(s.meta["source"])
        x, y, size = s.meta["crop"]
        assert 0.2 * min(photo.size) - 1 <= size <= 0.5 * min(photo.size) + 1
        assert 0 <= x and x + size <= photo.width and 0 <= y and y + size <= photo.height
        assert s.meta["source"].replace("_", " ") in s.caption
        assert s.key.startswith("photos-")


def test_crops_are_deterministic():
    a = list(generate_photos(10, seed=3))
    b = list(generate_photos(10, seed=3))
    c = list(generate_photos(10, seed=4))
    assert [s.meta for s in a] == [s.meta for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [s.meta for s in a] != [s.meta for s in c]
