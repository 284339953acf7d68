"""One entry point for "a source of images": an embedded dataset name or a dataset path.

``images_tensor`` is what trainers and evaluators call: embedded sources are generated from a seed
(no files needed), paths are read with format detection (webdataset shards, HF ``save_to_disk``
folders, image folders), with bad samples skipped and counted.
"""

from __future__ import annotations

import numpy as np
import torch

from data.skips import SkipCounter

EMBEDDED = ("shapes", "digits", "photos")


def images_tensor(
    source: str, num: int, resolution: int, seed: int = 0, split: str = "train"
) -> tuple[torch.Tensor, SkipCounter]:
    """uint8 images (N, 3, R, R) from ``source``.

    Embedded sources yield exactly ``num`` images (``split`` selects held-out digits/photos and the
    shapes stream). A path yields up to ``num`` images, resized/cropped to ``resolution`` (a no-op
    for data built at that resolution).
    """
    if num < 1:
        raise ValueError(f"num must be ≥ 1, got {num}")
    counter = SkipCounter()
    if source in EMBEDDED:
        from data.build import iter_dataset
        from data.images import resize_center_crop

        arrays = [
            np.asarray(resize_center_crop(s.image, resolution, "nearest"), dtype=np.uint8)
            for s in iter_dataset(source, num, resolution, seed, split, counter)
        ]
        pixels = (
            torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        )  # (N, H, W, 3) → (N, 3, H, W)
        return pixels, counter
    from data.torch_dataset import load_images_tensor

    pixels, _captions, counter = load_images_tensor(source, resolution, max_samples=num, resample="bicubic")
    if len(pixels) == 0:
        raise ValueError(f"no readable images in {source} ({counter.summary()})")
    return pixels, counter
