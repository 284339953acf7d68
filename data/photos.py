"""Real photographs bundled inside scikit-image (no pooch, no network), as held-out eval data.

The files are read straight from the installed `skimage/data` folder with PIL; only colour
photographs are used (the grayscale ones - camera, coins, moon, ... - and synthetic images
are excluded). Samples are random square crops whose side is a fraction (`crop_scale`) of the
photo's shorter side, resized to the target resolution with LANCZOS (antialiased downscaling).
Photos are used round-robin so every source is equally represented.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from data.images import decode_image
from data.sample import Sample

PHOTO_FILES: dict[str, str] = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "ihc": "ihc.png",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
}
PHOTO_NAMES: tuple[str, ...] = tuple(PHOTO_FILES)
TEMPLATES: tuple[str, ...] = (
    "a photo crop of {name}",
    "a crop of a photo of {name}",
    "a photo of {name}, cropped",
)


def photo_dir() -> Path:
    """The `skimage/data` folder of the installed scikit-image."""
    import skimage

    return Path(skimage.__file__).parent / "data"


@lru_cache(maxsize=len(PHOTO_FILES))
def load_photo(name: str) -> Image.Image:
    """The full RGB photograph `name` (one of PHOTO_NAMES), read from the local package files."""
    if name not in PHOTO_FILES:
        raise ValueError(f"unknown photo {name!r}; choose one of {PHOTO_NAMES}")
    path = photo_dir() / PHOTO_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed scikit-image")
    return decode_image(path)


def random_crop_box(
    width: int, height: int, rng: np.random.Generator, crop_scale: tuple[float, float]
) -> tuple[int, int, int]:
    """(x, y, size) of a random square inside a width x height image."""
    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
    size = max(1, round(rng.uniform(lo, hi) * min(width, height)))
    x = int(rng.integers(0, width - size + 1))
    y = int(rng.integers(0, height - size + 1))
    return x, y, size


def generate_photos(
    num: int,
    resolution: int = 32,
    seed: int = 0,
    crop_scale: tuple[float, float] = (0.15, 0.6),
    split: str = "train",
) -> Iterator[Sample]:
    """`num` photo crops; meta is {"source": name, "crop": [x, y, size]} in source pixels.

    `split` only selects a separate random stream ("train" or "test"): all photos are held-out
    evaluation data either way.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0 if split == "train" else 1]))
    for i in range(num):
        name = PHOTO_NAMES[i % len(PHOTO_NAMES)]
        photo = load_photo(name)
        x, y, size = random_crop_box(photo.width, photo.height, rng, crop_scale)
        crop = photo.crop((x, y, x + size, y + size))
        image = crop.resize((resolution, resolution), Image.Resampling.LANCZOS)
        caption = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(name=name.replace("_", " "))
        yield Sample(f"photos-{i:09d}", image, caption, {"source": name, "crop": [x, y, size]})
