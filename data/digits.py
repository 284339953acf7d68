"""Handwritten digits from scikit-learn's bundled 8x8 `load_digits` (1797 images, no download).

Each 8x8 image (values 0..16) becomes a white digit on black: scaled to 0..255, upscaled with
bilinear interpolation (smooth strokes; nearest would give 4x4-pixel blocks at 32 px) to 80% of
the canvas and centred, leaving a black border like MNIST (the 8x8 digits touch their edges).

The train/test split is fixed (a permutation with a constant seed, 80/20), independent of the
`seed` argument, so a classifier trained on train digits can be evaluated on held-out ones.
`seed` only orders the split. When `num` exceeds the split size, the digits repeat, and every
repetition after the first is shifted by a random 1-2 px (per axis, zero-filled) for variety.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
from PIL import Image

from data.sample import Sample

DIGIT_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
TEMPLATES: tuple[str, ...] = (
    "a handwritten digit {word}",
    "the digit {word}",
    "a handwritten {word}",
    "the number {word} written by hand",
)
SPLIT_SEED = 20240607
TEST_FRACTION = 0.2
BORDER = 0.1


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def split_indices(split: str) -> np.ndarray:
    """Indices into `load_digits()` of the fixed "train" (80%) or "test" (20%) split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _, labels = _load()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_test = round(TEST_FRACTION * len(labels))
    return np.sort(order[:n_test] if split == "test" else order[n_test:])


def render_digit(pixels8: np.ndarray, resolution: int = 32, shift: tuple[int, int] = (0, 0)) -> Image.Image:
    """An 8x8 digit (0..16) as an RGB image of `resolution` px, optionally shifted by (dx, dy) px."""
    gray = np.round(np.clip(pixels8, 0, 16) * (255.0 / 16.0)).astype(np.uint8)
    inner = max(1, round(resolution * (1.0 - 2 * BORDER)))
    small = Image.fromarray(gray, mode="L").resize((inner, inner), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (resolution, resolution), 0)
    canvas.paste(small, ((resolution - inner) // 2, (resolution - inner) // 2))
    big = np.asarray(canvas)
    dx, dy = shift
    if dx or dy:
        moved = np.zeros_like(big)
        h, w = big.shape
        moved[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = big[
            max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
        ]
        big = moved
    return Image.fromarray(np.repeat(big[:, :, None], 3, axis=2), mode="RGB")


def digit_caption(label: int, rng: np.random.Generator) -> str:
    """A caption naming the digit in word form, e.g. "a handwritten digit seven"."""
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(word=DIGIT_WORDS[label])


def generate_digits(num: int, resolution: int = 32, seed: int = 0, split: str = "train") -> Iterator[Sample]:
    """`num` digit samples from one split; meta is {"label": k, "index": i in load_digits}."""
    images, labels = _load()
    indices = split_indices(split)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0 if split == "train" else 1]))
    order = rng.permutation(indices)
    for i in range(num):
        cycle, position = divmod(i, len(order))
        if position == 0 and cycle > 0:
            order = rng.permutation(indices)
        index = int(order[position])
        shift = (0, 0)
        if cycle > 0:
            shift = tuple(int(v) * int(rng.choice([-1, 1])) for v in rng.integers(1, 3, size=2))
        label = int(labels[index])
        image = render_digit(images[index], resolution, shift)
        yield Sample(
            f"digits-{split}-{i:09d}", image, digit_caption(label, rng), {"label": label, "index": index}
        )
