"""Register the Stage-3 tasks and the model class with transformers (run once, on import).

* ``PIPELINE_REGISTRY``: ``"text-to-image"`` → :class:`TextToImagePipeline` and ``"image-to-text"`` →
  :class:`ImageToTextPipeline`, both over :class:`~ar_model.generator.MMGenerator`, so
  ``transformers.pipeline(task, model=DIR_OR_REPO)`` loads our folder with no ``trust_remote_code``.

The Auto classes are registered by importing :mod:`ar_model`: ``AutoConfig``/``AutoModel``/
``AutoModelForCausalLM`` for the decoder (:mod:`ar_model.modeling`) and ``AutoModelForImageTextToText``
→ ``MMGenerator`` (:mod:`ar_model.generator`). transformers 5 sends ``pipeline("image-to-text", ...)``
to that Auto class; with ``pipeline_class=ImageToTextPipeline`` the call then loads and runs our model.

transformers 5.24 logs that task rename with a stray ``UserWarning`` argument
(``logger.warning_once(msg, UserWarning)``), so formatting the record fails: plain logging prints a
"--- Logging error ---" traceback and pytest's log capture raises. :class:`_DropStrayWarningArgs`
repairs exactly that record on the ``transformers.pipelines`` logger so the user sees the warning text.
"""

from __future__ import annotations

import logging

from transformers.pipelines import PIPELINE_REGISTRY

from ar_model.generator import MMGenerator
from pipelines.image_to_text import ImageToTextPipeline
from pipelines.text_to_image import TextToImagePipeline

TASKS = {"text-to-image": TextToImagePipeline, "image-to-text": ImageToTextPipeline}


class _DropStrayWarningArgs(logging.Filter):
    """Drop a warning *class* passed as a %-format argument to a message with no placeholders."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (
            isinstance(args, tuple)
            and args
            and all(isinstance(a, type) and issubclass(a, Warning) for a in args)
            and "%" not in str(record.msg)
        ):
            record.args = ()
        return True


_PIPELINES_LOGGER = logging.getLogger("transformers.pipelines")


def register() -> None:
    """Idempotent: registering again replaces nothing that is already ours."""
    if not any(isinstance(f, _DropStrayWarningArgs) for f in _PIPELINES_LOGGER.filters):
        _PIPELINES_LOGGER.addFilter(_DropStrayWarningArgs())
    for task, cls in TASKS.items():
        current = PIPELINE_REGISTRY.supported_tasks.get(task)
        if current is None or current["impl"] is not cls:
            PIPELINE_REGISTRY.register_pipeline(
                task, pipeline_class=cls, pt_model=MMGenerator, type="multimodal"
            )


register()
