"""pipeline("image-to-text"): captions for generated images, every input kind, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

import pipelines  # noqa: F401  (registers the tasks)
from pipelines import ImageToTextPipeline


@pytest.fixture(scope="module")
def i2t(model_dir):
    # transformers 5 renames the task string "image-to-text" inside pipeline(); pipeline_class keeps ours.
    return pipeline("image-to-text", model=str(model_dir), pipeline_class=ImageToTextPipeline)


@pytest.fixture(scope="module")
def generated(model_dir) -> Image.Image:
    t2i = pipeline("text-to-image", model=str(model_dir))
    return t2i("a red circle", generator=0, progress_bar=False)[0]["image"]


def test_a_generated_image_gets_text(i2t, generated):
    out = i2t(generated, max_new_tokens=8)
    assert isinstance(out, list) and len(out) == 1 and set(out[0]) == {"generated_text"}
    assert isinstance(out[0]["generated_text"], str)
    gen = i2t.model
    pixels = np.asarray(generated).transpose(2, 0, 1)[None]  # (1, 3, H, W)
    import torch

    assert out[0]["generated_text"] == gen.image_to_text(torch.from_numpy(pixels.copy()), max_new_tokens=8)[0]


def test_a_list_of_images_gives_a_list_of_results(i2t, generated):
    out = i2t([generated, generated.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], max_new_tokens=4)
    assert len(out) == 2 and all(len(r) == 1 and isinstance(r[0]["generated_text"], str) for r in out)


def test_pil_modes_paths_and_arrays_are_converted(i2t, generated, tmp_path):
    # Sampled (not greedy) so that the caption of a barely trained model is a non-empty function of
    # the image codes: a conversion that changed the pixels would change it.
    sampling = dict(max_new_tokens=6, temperature=1.0, generator=1)
    rgb = i2t(generated, **sampling)
    assert rgb[0]["generated_text"]
    path = tmp_path / "img.png"
    generated.save(path)
    array = np.asarray(generated)
    # Lossless conversions of the same pixels give the same caption.
    same = [str(path), path, array, array.astype(np.float32) / 255.0, generated.convert("RGBA")]
    for item in same:
        assert i2t(item, **sampling) == rgb, type(item)
    # Other modes and sizes are converted (not refused) and captioned.
    others = [
        generated.convert("L"),
        generated.convert("P"),
        generated.convert("CMYK"),
        generated.convert("L").convert("I;16"),
        generated.resize((96, 64)),
        np.zeros((40, 50), np.uint8),
    ]
    for item in others:
        assert isinstance(i2t(item, max_new_tokens=4)[0]["generated_text"], str)


@pytest.mark.parametrize(
    ("images", "kwargs", "error", "message"),
    [
        ([], {}, ValueError, "empty list"),
        (3, {}, TypeError, "PIL image, a path or a numpy array"),
        ("/nonexistent/image.png", {}, FileNotFoundError, "not found"),
        (None, {"max_new_tokens": 0}, ValueError, "max_new_tokens must be ≥ 1"),
        (None, {"beams": 2}, TypeError, "unexpected arguments ['beams']"),
    ],
)
def test_bad_input_gets_a_clear_error(i2t, generated, images, kwargs, error, message):
    with pytest.raises(error) as info:
        i2t(generated if images is None else images, **kwargs)
    assert message in str(info.value)


def test_corrupt_file_is_a_clear_error(i2t, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="corrupt|truncated"):
        i2t(str(bad))


def test_the_upstream_task_rename_warning_formats():
    # transformers 5.24 logs its "image-to-text" rename as warning_once(msg, UserWarning); without
    # pipelines.registration's filter the record cannot be formatted and pytest's capture raises.
    import logging

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    logger, keep = logging.getLogger("transformers.pipelines"), Keep()
    logger.addHandler(keep)
    try:
        logger.warning("task renamed to `image-text-to-text`.", UserWarning)
        logger.warning("kept %s", "args")
    finally:
        logger.removeHandler(keep)
    assert keep.messages == ["task renamed to `image-text-to-text`.", "kept args"]
