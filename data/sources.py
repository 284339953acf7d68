"""One entry point for "a source of images": an embedded dataset name or a dataset path.

``images_tensor`` is what trainers and evaluators call: embedded sources are generated from a seed
(no files needed), paths are read with format detection (webdataset shards, HF ``save_to_disk``
folders, image folders), with bad samples skipped and counted. ``samples_tensor`` also returns
the captions and keys (e.g. for ``data.extract_codes``).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import torch

from data.skips import SkipCounter

EMBEDDED = ("shapes", "digits", "photos")
LOGGER = logging.getLogger("data")


def check_source(source: str, allow_pipe: bool = False, what: str = "source") -> None:
    """Raise ValueError, saying what is allowed, unless ``source`` is an embedded dataset, an existing
    path, a shard pattern or a URL. ``pipe:`` URLs run a shell command: refused unless ``allow_pipe``."""
    from data.readers import _is_pattern

    if not isinstance(source, str) or not source:
        raise ValueError(f"{what} must be a non-empty string, got {source!r}")
    if source in EMBEDDED:
        return
    if source.startswith("pipe:"):
        if not allow_pipe:
            raise ValueError(
                f"{what} {source!r} is a 'pipe:' URL, which runs a shell command; pass --allow_pipe true "
                "(allow_pipe=True) if you trust it"
            )
        return
    if "://" in source or _is_pattern(source) or Path(source).exists():
        return
    raise ValueError(
        f"unknown {what} {source!r}: choose one of {', '.join(EMBEDDED)} or the path of a dataset "
        "(webdataset shards, a save_to_disk folder or an image folder)"
    )


def samples_tensor(
    source: str,
    num: int,
    resolution: int,
    seed: int = 0,
    split: str = "train",
    allow_pipe: bool = False,
) -> tuple[torch.Tensor, list[str], list[str], SkipCounter]:
    """uint8 images (N, 3, R, R), their captions and keys, and the skip counts of ``source``.

    Embedded sources yield exactly ``num`` samples (``split`` selects held-out digits/photos and the
    shapes stream). A path yields up to ``num`` samples, resized/cropped to ``resolution`` (a no-op
    for data built at that resolution).
    """
    if num < 1:
        raise ValueError(f"num must be ≥ 1, got {num}")
    from data.images import resize_center_crop

    counter = SkipCounter()
    if source in EMBEDDED:
        from data.build import iter_dataset

        samples, resample = iter_dataset(source, num, resolution, seed, split, counter), "nearest"
    else:
        from data.readers import open_samples

        samples = open_samples(source, skip_counter=counter, allow_pipe=allow_pipe)
        samples, resample = itertools.islice(samples, num), "bicubic"
    arrays: list[np.ndarray] = []
    captions: list[str] = []
    keys: list[str] = []
    for sample in samples:
        arrays.append(np.asarray(resize_center_crop(sample.image, resolution, resample), dtype=np.uint8))
        captions.append(sample.caption)
        keys.append(sample.key)
    if source not in EMBEDDED:
        counter.log_summary(LOGGER)
    if not arrays:
        raise ValueError(f"no readable images in {source} ({counter.summary()})")
    # (N, H, W, 3) → (N, 3, H, W)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return pixels, captions, keys, counter


def images_tensor(
    source: str,
    num: int,
    resolution: int,
    seed: int = 0,
    split: str = "train",
    allow_pipe: bool = False,
) -> tuple[torch.Tensor, SkipCounter]:
    """uint8 images (N, 3, R, R) from ``source`` (see ``samples_tensor``)."""
    pixels, _captions, _keys, counter = samples_tensor(source, num, resolution, seed, split, allow_pipe)
    return pixels, counter
