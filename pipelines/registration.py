"""Register the Stage-3 tasks and the model class with transformers (run once, on import).

* ``PIPELINE_REGISTRY``: ``"text-to-image"`` → :class:`TextToImagePipeline` and ``"image-to-text"`` →
  :class:`ImageToTextPipeline`, both over :class:`~ar_model.generator.MMGenerator`, so
  ``transformers.pipeline(task, model=DIR_OR_REPO)`` loads our folder with no ``trust_remote_code``.

The Auto classes are registered by importing :mod:`ar_model`: ``AutoConfig``/``AutoModel``/
``AutoModelForCausalLM`` for the decoder (:mod:`ar_model.modeling`) and ``AutoModelForImageTextToText``
→ ``MMGenerator`` (:mod:`ar_model.generator`). transformers 5 sends ``pipeline("image-to-text", ...)``
to that Auto class; with ``pipeline_class=ImageToTextPipeline`` the call then loads and runs our model.
"""

from __future__ import annotations

from transformers.pipelines import PIPELINE_REGISTRY

from ar_model.generator import MMGenerator
from pipelines.image_to_text import ImageToTextPipeline
from pipelines.text_to_image import TextToImagePipeline

TASKS = {"text-to-image": TextToImagePipeline, "image-to-text": ImageToTextPipeline}


def register() -> None:
    """Idempotent: registering again replaces nothing that is already ours."""
    for task, cls in TASKS.items():
        current = PIPELINE_REGISTRY.supported_tasks.get(task)
        if current is None or current["impl"] is not cls:
            PIPELINE_REGISTRY.register_pipeline(
                task, pipeline_class=cls, pt_model=MMGenerator, type="multimodal"
            )


register()
