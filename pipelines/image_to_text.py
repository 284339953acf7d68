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
from transformers import Pipeline

from ar_model.generator import MMGenerator
from data.images import decode_image, resize_center_crop, to_rgb

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


class ImageToTextPipeline(Pipeline):
    """Captioning with an :class:`~ar_model.generator.MMGenerator`.

    Call arguments: ``max_new_tokens`` (32), ``temperature`` (0 = greedy), ``top_k``, ``top_p``,
    ``generator`` (a ``torch.Generator`` or int seed, for sampling), ``batch_size`` (64).
    Returns ``[{"generated_text": str}]`` for one image, a list of those for a list of images.
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False
    _pipeline_calls_generate = False

    def __init__(self, model: MMGenerator, *args: Any, **kwargs: Any) -> None:
        if not isinstance(model, MMGenerator):
            raise TypeError(
                f"image-to-text needs an MMGenerator (a folder or repo id), got {type(model).__name__}"
            )
        kwargs.setdefault("device", model.device)
        super().__init__(model, *args, **kwargs)

    def _sanitize_parameters(self, **kwargs: Any) -> tuple[dict, dict, dict]:
        unknown = sorted(set(kwargs) - set(_CALL_KEYS))
        if unknown:
            raise TypeError(f"image-to-text: unexpected arguments {unknown}; allowed: {list(_CALL_KEYS)}")
        return {}, {k: v for k, v in kwargs.items() if v is not None}, {}

    def __call__(self, images: Any, **kwargs: Any) -> list:
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if not items:
            raise ValueError("images is an empty list: give at least one image")
        _, call_params, _ = self._sanitize_parameters(**kwargs)
        outputs = self.forward(self.preprocess(items), **{**self._forward_params, **call_params})
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
