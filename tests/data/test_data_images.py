"""Tests for data.images: decoding, mode conversion, resizing, tensors and grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import encode, noise_rgb, png_claiming_size
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from data.images import (
    BadImageError,
    decode_image,
    make_grid,
    pil_to_tensor,
    resize_center_crop,
    tensor_to_pil,
    to_rgb,
)


def test_decode_png_is_lossless_rgb():
    img = noise_rgb(0)
    out = decode_image(encode(img))
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_decode_from_path(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(encode(noise_rgb(1)))
    assert np.array_equal(np.asarray(decode_image(path)), np.asarray(noise_rgb(1)))
    assert decode_image(str(path)).size == (32, 32)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"definitely not an image", "corrupt"),
        (encode(noise_rgb(2))[:600], "truncated"),
        (png_claiming_size(20_000, 20_000), "too_large"),
    ],
)
def test_bad_images_raise_with_reason(data, reason):
    with pytest.raises(BadImageError) as info:
        decode_image(data)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


def test_max_pixels_is_enforced_before_decoding():
    data = encode(Image.new("RGB", (100, 100)))
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(BadImageError, match="too_large"):
        decode_image(data, max_pixels=9_999)


def test_missing_file_is_a_bad_image(tmp_path):
    with pytest.raises(BadImageError):
        decode_image(tmp_path / "nope.png")


def test_rgba_is_composited_on_black():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = [[255, 0], [128, 51]]
    out = np.asarray(decode_image(encode(Image.fromarray(rgba, mode="RGBA"))))
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert out[1, 0].tolist() == [100, 50, 25]
    assert out[1, 1].tolist() == [40, 20, 10]


def test_la_and_palette_transparency_go_to_black():
    la = Image.fromarray(
        np.dstack([np.full((2, 2), 200, np.uint8), np.array([[255, 0], [0, 255]], np.uint8)]), "LA"
    )
    out = np.asarray(decode_image(encode(la)))
    assert out[0, 0].tolist() == [200] * 3 and out[0, 1].tolist() == [0] * 3
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    out = np.asarray(decode_image(encode(pal, transparency=0)))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [0, 255, 0]


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    out = np.asarray(decode_image(encode(Image.fromarray(values))))[0, :, 0]
    assert out.tolist() == [0, 0, 1, 128, 255]
    as_mode_i = Image.fromarray(values.astype(np.int32), mode="I")
    assert np.asarray(to_rgb(as_mode_i))[0, :, 0].tolist() == [0, 0, 1, 128, 255]


def test_other_modes_convert():
    assert np.asarray(decode_image(encode(Image.new("1", (3, 3), 1))))[0, 0].tolist() == [255] * 3
    assert np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32), mode="F")))[0, 0, 0] == 128
    cmyk = decode_image(encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", quality=100))
    r, g, b = np.asarray(cmyk)[2, 2].tolist()
    assert r > 240 and g < 15 and b < 15
    assert to_rgb(Image.new("YCbCr", (2, 2))).mode == "RGB"


@pytest.mark.parametrize(
    "mode",
    [
        "1",
        "L",
        "LA",
        "La",
        "P",
        "PA",
        "RGB",
        "RGBA",
        "RGBa",
        "RGBX",
        "CMYK",
        "YCbCr",
        "HSV",
        "I",
        "I;16",
        "F",
    ],
)
def test_every_common_pil_mode_converts(mode):
    out = to_rgb(Image.new(mode, (5, 3)))
    assert out.mode == "RGB" and out.size == (5, 3)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.bool_, np.uint8, np.uint16, np.int32, np.float32, np.float64]),
        shape=st.one_of(
            st.tuples(st.integers(1, 6), st.integers(1, 6)),
            st.tuples(st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 2, 3, 4])),
        ),
    )
)
def test_to_rgb_arrays_give_rgb_uint8_of_same_size(array):
    out = to_rgb(array)
    assert out.mode == "RGB"
    assert out.size == (array.shape[1], array.shape[0])
    assert np.asarray(out).dtype == np.uint8


def test_to_rgb_array_conventions():
    assert np.asarray(to_rgb(np.array([[0.0, 1.0, 0.5]])))[0, :, 0].tolist() == [0, 255, 128]
    assert np.asarray(to_rgb(np.array([[0, 65535]], np.uint16)))[0, :, 0].tolist() == [0, 255]
    assert np.asarray(to_rgb(np.array([[True, False]])))[0, :, 0].tolist() == [255, 0]
    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(to_rgb(rgb)), rgb)
    with pytest.raises(BadImageError):
        to_rgb(np.zeros((2, 2, 5), np.uint8))


def test_resize_center_crop():
    img = Image.new("RGB", (60, 30), (255, 0, 0))
    img.paste((0, 255, 0), (15, 0, 45, 30))  # green centre square, red side bands
    out = resize_center_crop(img, 10, "nearest")
    assert out.size == (10, 10)
    assert np.all(np.asarray(out) == (0, 255, 0))
    tall = resize_center_crop(Image.new("RGB", (30, 90)), 16, "bicubic")
    assert tall.size == (16, 16)
    same = noise_rgb(4)
    assert resize_center_crop(same, 32, "nearest") is same


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 80),
    st.integers(1, 80),
    st.integers(1, 40),
    st.sampled_from(["nearest", "bicubic", "lanczos"]),
)
def test_resize_center_crop_always_gives_a_square(width, height, resolution, resample):
    out = resize_center_crop(Image.new("L", (width, height), 9), resolution, resample)
    assert out.mode == "RGB" and out.size == (resolution, resolution)
    assert np.all(np.asarray(out) == 9)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    img.putpixel((0, 0), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    out = decode_image(encode(img, exif=exif))
    assert out.size == (2, 4)
    assert np.asarray(out)[0, 1].tolist() == [0, 255, 0]


def test_resize_rejects_unknown_filter():
    with pytest.raises(ValueError, match="unknown resample"):
        resize_center_crop(noise_rgb(0), 16, "sharpest")


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 5), st.integers(1, 5), st.just(3))))
def test_tensor_round_trip_is_exact(pixels):
    img = Image.fromarray(pixels, mode="RGB")
    tensor = pil_to_tensor(img)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, *pixels.shape[:2])
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    assert np.array_equal(np.asarray(tensor_to_pil(tensor)), pixels)


def test_tensor_to_pil_clamps_and_rounds():
    t = torch.tensor([[[-3.0, 2.0, 0.0, 0.004]]]).repeat(3, 1, 1)
    assert np.asarray(tensor_to_pil(t))[0, :, 0].tolist() == [0, 255, 128, 128]
    with pytest.raises(ValueError):
        tensor_to_pil(torch.zeros(1, 4, 4))


def test_make_grid_layout():
    tiles = [Image.new("RGB", (4, 4), (10 * i, 0, 0)) for i in range(5)]
    grid = make_grid(tiles, nrow=3, pad=1)
    assert grid.size == (3 * 4 + 4 * 1, 2 * 4 + 3 * 1)
    pixels = np.asarray(grid)
    assert pixels[1, 1].tolist() == [0, 0, 0]
    assert pixels[1 + 4 + 1 + 1, 1 + 4 + 1 + 1].tolist() == [40, 0, 0]  # row 1, col 1 = tile 4
    assert pixels[0, 0].tolist() == [0, 0, 0]
