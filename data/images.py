"""Robust image decoding and conversion shared by every reader and generator.

Everything that enters the training pipeline goes through `decode_image` (bytes or files) or
`to_rgb` (already-open PIL images and numpy arrays), so all data ends up as 8-bit RGB with the
same conventions:

* alpha (RGBA, LA, PA, P with transparency) is composited onto black, matching the black
  background of the embedded datasets;
* 16-bit data (I;16*, uint16 arrays, and mode "I", which PIL uses for 16-bit PNGs) is scaled to
  8 bits with `>> 8` instead of being clipped at 255;
* float data (mode "F", float arrays) is taken to be in [0, 1];
* images above `max_pixels` are rejected before their pixels are decoded (decompression bombs);
* the EXIF orientation of camera photos is applied.

Problems raise `BadImageError` whose `reason` is a short category (`empty`, `corrupt`,
`truncated`, `too_large`, `mode`) that readers feed to a `SkipCounter`.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from data.skips import SkipCounter

if TYPE_CHECKING:
    import torch

__all__ = [
    "BadImageError",
    "SkipCounter",
    "decode_image",
    "make_grid",
    "pil_to_tensor",
    "resize_center_crop",
    "resolve_resample",
    "tensor_to_pil",
    "to_rgb",
]

DEFAULT_MAX_PIXELS = 64_000_000

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


class BadImageError(ValueError):
    """An image that cannot be turned into RGB; `reason` is a short category for skip counting."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def decode_image(data: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes (or a file) into an RGB image, or raise `BadImageError`.

    The size is checked from the header before any pixel is decoded, and `load()` runs inside
    the try block so truncated files fail here instead of later in a DataLoader worker.
    """
    if isinstance(data, (str, Path)):
        try:
            data = Path(data).read_bytes()
        except OSError as err:
            raise BadImageError("unreadable", str(err)) from err
    if len(data) == 0:
        raise BadImageError("empty", "0-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise BadImageError("too_large", f"{width}x{height} exceeds max_pixels={max_pixels}")
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImageError("too_large", str(err)) from err
    except Image.UnidentifiedImageError as err:
        raise BadImageError("corrupt", "not a recognised image format") from err
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as err:
        reason = "truncated" if "truncated" in str(err).lower() else "corrupt"
        raise BadImageError(reason, str(err)) from err
    return to_rgb(img)


def to_rgb(img: Image.Image | np.ndarray) -> Image.Image:
    """Convert a PIL image of any common mode, or an HxW / HxWxC array, to an 8-bit RGB image.

    Arrays: HxW and HxWx1 are gray, HxWx2 gray+alpha, HxWx3 RGB, HxWx4 RGBA. Dtypes: bool,
    uint8, uint16 (>> 8), other integers (8-bit if all values fit in 0..255, else 16-bit),
    floats in [0, 1] (NaN becomes 0).
    """
    if isinstance(img, np.ndarray):
        return _array_to_rgb(img)
    if not isinstance(img, Image.Image):
        raise BadImageError("mode", f"expected a PIL image or numpy array, got {type(img).__name__}")
    try:
        return _pil_to_rgb(img)
    except (ValueError, OSError) as err:
        raise BadImageError("mode", f"cannot convert mode {img.mode!r} to RGB: {err}") from err


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("L", "1"):
        return img.convert("L").convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img).astype(np.int64)
        return _array_to_rgb(np.clip(values, 0, 65535).astype(np.uint16))
    if mode == "F":
        return _array_to_rgb(np.asarray(img, dtype=np.float32))
    if mode in ("RGBa", "La"):
        # premultiplied alpha: the colour channels already are the composite onto black
        return _array_to_rgb(np.asarray(img)[:, :, : 3 if mode == "RGBa" else 1])
    if mode in ("RGBA", "LA", "PA", "P"):
        return _array_to_rgb(np.asarray(img.convert("RGBA")))
    return img.convert("RGB")


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale an array of any supported dtype to uint8 (see `to_rgb` for the conventions)."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return (array >> 8).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        values = np.clip(array.astype(np.int64), 0, 65535)
        if values.size and values.max() > 255:
            return (values >> 8).astype(np.uint8)
        return values.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise BadImageError("mode", f"unsupported array dtype {array.dtype}")


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (2, 3, 4)):
        raise BadImageError("mode", f"unsupported array shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise BadImageError("empty", f"array of shape {array.shape}")
    pixels = _array_to_uint8(array)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    elif pixels.shape[2] == 2:
        pixels = _over_black(np.repeat(pixels[:, :, :1], 3, axis=2), pixels[:, :, 1])
    elif pixels.shape[2] == 4:
        pixels = _over_black(pixels[:, :, :3], pixels[:, :, 3])
    return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")


def _over_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-composite straight (non-premultiplied) colour onto a black background."""
    out = rgb.astype(np.uint32) * alpha.astype(np.uint32)[:, :, None]
    return ((out + 127) // 255).astype(np.uint8)


def resolve_resample(resample: str | int) -> Image.Resampling:
    """Map a name ("nearest", "bilinear", "bicubic", "lanczos", "box") or PIL constant to a filter."""
    if isinstance(resample, str):
        try:
            return RESAMPLE[resample.lower()]
        except KeyError:
            raise ValueError(f"unknown resample {resample!r}; choose one of {sorted(RESAMPLE)}") from None
    return Image.Resampling(resample)


def resize_center_crop(img: Image.Image, resolution: int, resample: str | int = "bicubic") -> Image.Image:
    """Resize so the shorter side equals `resolution`, then take the centred square crop.

    Use "bicubic" (or "lanczos") for photos and "nearest" for the shapes/digits data, where
    sharp edges and the exact palette matter. An image already at the target size is returned
    unchanged.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    img = to_rgb(img)
    width, height = img.size
    if (width, height) == (resolution, resolution):
        return img
    scale = resolution / min(width, height)
    new_w = max(resolution, round(width * scale))
    new_h = max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), resolve_resample(resample))
    left = (new_w - resolution) // 2
    top = (new_h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor (3, H, W) in [-1, 1] (0 -> -1, 255 -> 1)."""
    import torch

    pixels = np.asarray(to_rgb(img), dtype=np.uint8)
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float()
    return tensor / 127.5 - 1.0


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> RGB image; values are clamped, then rounded."""
    import torch

    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    values = ((tensor.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    pixels = values.to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")


def make_grid(images: list[Image.Image], nrow: int = 8, pad: int = 2, pad_value: int = 0) -> Image.Image:
    """Tile images into a grid with `nrow` images per row and `pad` pixels between tiles.

    Tiles are placed top-left in cells as large as the largest image. Used for sample and
    reconstruction grids.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    tiles = [to_rgb(img) for img in images]
    cell_w = max(t.width for t in tiles)
    cell_h = max(t.height for t in tiles)
    cols = min(nrow, len(tiles))
    rows = -(-len(tiles) // cols)
    width = cols * cell_w + (cols + 1) * pad
    height = rows * cell_h + (rows + 1) * pad
    grid = Image.new("RGB", (width, height), (pad_value,) * 3)
    for i, tile in enumerate(tiles):
        row, col = divmod(i, cols)
        grid.paste(tile, (pad + col * (cell_w + pad), pad + row * (cell_h + pad)))
    return grid
