"""What the two Stage-3 pipelines share: the model check, the device rule, and saving.

* Nothing of transformers' own is loaded behind the user's back (all ``_load_*`` flags are off): the
  tokenizers live inside the :class:`~ar_model.generator.MMGenerator` folder.
* The pipeline stays on the device the model is on (CPU fp32 unless the user moved it), instead of
  transformers' default of the first accelerator.
* ``save_pretrained``/``push_to_hub`` write the model's own folder. transformers' generic versions
  would add ``custom_pipelines`` to config.json and copy this package's source into the folder,
  which would then need ``trust_remote_code`` to load: exactly what a folder must never need.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import Pipeline

from ar_model.generator import MMGenerator


class MMPipeline(Pipeline):
    """Base of :class:`~pipelines.TextToImagePipeline` and :class:`~pipelines.ImageToTextPipeline`."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False
    _pipeline_calls_generate = False
    #: keyword arguments a call (or the constructor) accepts
    call_keys: tuple[str, ...] = ()

    def __init__(self, model: MMGenerator, *args: Any, **kwargs: Any) -> None:
        if not isinstance(model, MMGenerator):
            got = type(model).__name__
            raise TypeError(f"{self.task_name()} needs an MMGenerator (a folder or Hub repo id), got {got}")
        kwargs.setdefault("device", model.device)
        super().__init__(model, *args, **kwargs)

    @classmethod
    def task_name(cls) -> str:
        return cls.__name__

    def _sanitize_parameters(self, **kwargs: Any) -> tuple[dict, dict, dict]:
        unknown = sorted(set(kwargs) - set(self.call_keys))
        if unknown:
            raise TypeError(
                f"{self.task_name()}: unexpected arguments {unknown}; allowed: {list(self.call_keys)}"
            )
        return {}, {k: v for k, v in kwargs.items() if v is not None}, {}

    def call_params(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The constructor's parameters updated with this call's (both checked)."""
        _, params, _ = self._sanitize_parameters(**kwargs)
        return {**self._forward_params, **params}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        """Write the model's folder (:meth:`MMGenerator.save_pretrained`), loadable by ``pipeline``."""
        return self.model.save_pretrained(save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Upload the model's folder (:meth:`MMGenerator.push_to_hub`): ``private``, ``token``, ..."""
        return self.model.push_to_hub(repo_id, **kwargs)
