"""The one record type every reader and generator in `data` produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Sample:
    """An image with its caption.

    `key` is unique within a dataset and is used as the webdataset key (no dots).
    `image` is always an RGB PIL image. `meta` is JSON-serialisable: the scene spec for shapes,
    `{"label": k}` for digits, `{"source": name, "crop": [x, y, size]}` for photos.
    """

    key: str
    image: Image.Image
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
