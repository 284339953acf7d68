"""Stage 3: Hugging Face pipelines, the command line, and the main job.

Importing this package registers ``pipeline("text-to-image")`` and ``pipeline("image-to-text")``
with transformers (:mod:`pipelines.registration`).
"""

from pipelines.image_to_text import ImageToTextPipeline
from pipelines.registration import register
from pipelines.text_to_image import TextToImagePipeline

__all__ = ["ImageToTextPipeline", "TextToImagePipeline", "register"]
