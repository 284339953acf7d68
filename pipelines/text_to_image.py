"""``pipeline("text-to-image", model=DIR_OR_REPO)``: prompts in, PIL images out.

A thin :class:`transformers.Pipeline` over :meth:`ar_model.generator.MMGenerator.text_to_tokens`:
prompts are checked, batched (``batch_size``), sampled with classifier-free guidance and decoded
by the model's own image tokenizer. Each image's randomness depends only on the seed, its prompt
and its index for that prompt, so a list of prompts gives the same images as one prompt at a time.
The pipeline loads no tokenizer or processor of transformers' own: everything is in the model folder.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from ar_model.generator import MMGenerator, check_prompts
from pipelines.mm_pipeline import MMPipeline

__all__ = ["TextToImagePipeline"]

_CALL_KEYS = (
    "num_images_per_prompt",
    "num_candidates",
    "guidance_scale",
    "cfg_schedule",
    "temperature",
    "top_k",
    "top_p",
    "num_inference_steps",
    "sampler",
    "guidance_interval",
    "height",
    "width",
    "generator",
    "batch_size",
    "progress_bar",
)


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 ``(N, 3, H, W)`` → N RGB images."""
    pixels = images.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (N, H, W, 3)
    return [Image.fromarray(np.ascontiguousarray(p), mode="RGB") for p in pixels]


class TextToImagePipeline(MMPipeline):
    """Text-to-image generation with an :class:`~ar_model.generator.MMGenerator`.

    Call arguments (each may also be given when the pipeline is built):

    * ``num_images_per_prompt`` (1), ``guidance_scale`` (1.5; 1 = no guidance, ≥ 0),
      ``cfg_schedule`` ("constant" | "linear"), ``temperature`` (1.0), ``top_k``, ``top_p``;
    * ``num_candidates`` (1): sample this many candidates per image and keep the one whose prompt the model
      itself finds likeliest as its caption (self-reranking, :mod:`ar_model.rerank`; costs that many
      times the sampling);
    * ``height``, ``width``: pixels, a multiple of the tokenizer's factor (default: the training size);
    * ``generator``: a ``torch.Generator`` or an int seed (None: drawn from torch's global RNG);
    * ``batch_size`` (16) rows per forward pass; ``progress_bar`` (True) shows a tqdm bar per batch;
    * ``num_inference_steps`` (4) and ``sampler`` ("euler" | "heun"): the diffusion head's steps, for
      models with continuous image tokens; ``num_inference_steps`` is ignored, with a warning, by discrete
      ones (``top_k``/``top_p`` apply to discrete codes only);
    * ``guidance_interval`` (None): ``(lo, hi)`` in the head's flow time (0 = noise): guide only the flow
      steps that start inside it (diffusion-head models; an error for discrete ones).

    Returns ``[{"image": PIL.Image}, ...]`` (``num_images_per_prompt`` dicts) for one prompt and a
    list of such lists for a list of prompts.
    """

    call_keys = _CALL_KEYS

    @classmethod
    def task_name(cls) -> str:
        return "text-to-image"

    def __call__(self, prompts: str | list[str], **kwargs: Any) -> list:
        single = isinstance(prompts, str)
        prompts = check_prompts(prompts)
        params = self.call_params(kwargs)
        outputs = self.forward(self.preprocess(prompts), **params)
        return self.postprocess(outputs, single=single)

    def preprocess(self, prompts: list[str]) -> dict[str, Any]:
        return {"prompts": prompts}

    def _forward(self, model_inputs: dict[str, Any], **params: Any) -> dict[str, Any]:
        model: MMGenerator = self.model
        if "num_inference_steps" in params and not model.is_continuous:
            params.pop("num_inference_steps")
            warnings.warn(
                "num_inference_steps applies to diffusion-head models; this model samples discrete codes "
                "token by token, so it is ignored",
                stacklevel=4,
            )
        generator = params.pop("generator", None)
        if generator is None:
            generator = int(torch.randint(0, 2**62, (1,)).item())
        elif not isinstance(generator, (int, torch.Generator)) or isinstance(generator, bool):
            raise TypeError(
                f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}"
            )
        batch_size = params.pop("batch_size", None) or self._batch_size or 16
        progress = params.pop("progress_bar", True)
        tokens = model.text_to_tokens(
            model_inputs["prompts"], seed=generator, batch_size=batch_size, progress=progress, **params
        )  # (N * k, h, w) codes or (N * k, h, w, D) latents
        k = params.get("num_images_per_prompt", 1)
        return {"images": model.decode_tokens(tokens), "per_prompt": k}

    def postprocess(self, outputs: dict[str, Any], single: bool = False) -> list:
        images, k = _to_pil(outputs["images"]), outputs["per_prompt"]
        per_prompt = [[{"image": img} for img in images[i : i + k]] for i in range(0, len(images), k)]
        return per_prompt[0] if single else per_prompt
