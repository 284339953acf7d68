"""``pipeline("image-to-text", model=DIR_OR_REPO)``: images in, captions out.

Accepts PIL images of any common mode, file paths, numpy arrays (HxW, HxWxC; uint8 or floats in
[0, 1]) or a list of them. Each is converted to RGB (alpha composited over black, the shapes'
background), resized and center-cropped to the model's training resolution, encoded by the model's
image tokenizer, and captioned by the decoder (:meth:`ar_model.generator.MMGenerator.image_to_text`).

transformers 5 rewrites the task name ``"image-to-text"`` to its own ``"image-text-to-text"``
inside ``pipeline()`` before it looks at the registry, so there the call is
``pipeline("image-to-text", model=DIR, pipeline_class=ImageToTextPipeline)`` (see the README).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from data.images import decode_image, resize_center_crop, to_rgb
from pipelines.mm_pipeline import MMPipeline

__all__ = ["ImageToTextPipeline", "load_rgb"]

_CALL_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "generator", "batch_size")


def load_rgb(image: Any) -> Image.Image:
    """A PIL image (any mode), a path, or a numpy array → an RGB PIL image (clear error otherwise)."""
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image file not found: {image}")
        return decode_image(image)
    if isinstance(image, (Image.Image, np.ndarray)):
        return to_rgb(image)
    raise TypeError(f"an image must be a PIL image, a path or a numpy array, got {type(image).__name__}")


class ImageToTextPipeline(MMPipeline):
    """Captioning with an :class:`~ar_model.generator.MMGenerator`.

    Call arguments: ``max_new_tokens`` (32), ``temperature`` (0 = greedy), ``top_k``, ``top_p``,
    ``generator`` (a ``torch.Generator`` or int seed, for sampling), ``batch_size`` (64).
    Returns ``[{"generated_text": str}]`` for one image, a list of those for a list of images.
    """

    call_keys = _CALL_KEYS

    @classmethod
    def task_name(cls) -> str:
        return "image-to-text"

    def __call__(self, images: Any, **kwargs: Any) -> list:
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if not items:
            raise ValueError("images is an empty list: give at least one image")
        outputs = self.forward(self.preprocess(items), **self.call_params(kwargs))
        return self.postprocess(outputs, single=single)

    def preprocess(self, images: list[Any]) -> dict[str, torch.Tensor]:
        size = self.model.resolution
        arrays = [np.asarray(resize_center_crop(load_rgb(img), size), dtype=np.uint8) for img in images]
        pixels = (
            torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        )  # (N, H, W, 3) -> (N, 3, H, W)
        return {"pixels": pixels}

    def _forward(self, model_inputs: dict[str, torch.Tensor], **params: Any) -> dict[str, Any]:
        seed = params.pop("generator", 0)
        captions = self.model.image_to_text(model_inputs["pixels"], seed=seed, **params)
        return {"captions": captions}

    def postprocess(self, outputs: dict[str, Any], single: bool = False) -> list:
        results = [[{"generated_text": text}] for text in outputs["captions"]]
        return results[0] if single else results
