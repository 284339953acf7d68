"""Shared helpers for the data tests: encoded images of every awkward kind and tiny tar shards."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise_rgb(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mode="RGB")


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims width x height (a decompression bomb header)."""
    data = bytearray(encode(Image.new("L", (4, 4))))
    # IHDR chunk: 8-byte signature, 4-byte length, b"IHDR", then width and height
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


def write_tar(path: Path, records: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write records ({ext: bytes}) as a webdataset-style tar, files in record order."""
    with tarfile.open(path, "w") as tar:
        for key, files in records:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def awkward_records() -> tuple[list[tuple[str, dict[str, bytes]]], dict[str, str], dict[str, np.ndarray]]:
    """Records covering every bad or unusual case.

    Returns (records, expected skip reason per skipped key, expected RGB pixels per converted key).
    """
    truncated = encode(noise_rgb(1))
    truncated = truncated[: len(truncated) * 3 // 5]
    rgba = np.dstack(
        [np.full((8, 8, 3), 200, np.uint8), np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))]
    )
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    gray16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    palette_img = noise_rgb(2, 8).convert("P")
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    txt = b"a caption"
    records = [
        ("bad-corrupt", {"png": b"\x89PNG\r\n\x1a\nthis is not a png", "txt": txt}),
        ("bad-truncated", {"png": truncated, "txt": txt}),
        ("bad-empty", {"png": b"", "txt": txt}),
        ("bad-huge", {"png": png_claiming_size(20_000, 20_000), "txt": txt}),
        ("bad-noimage", {"txt": txt}),
        ("ok-rgba", {"png": encode(Image.fromarray(rgba, mode="RGBA")), "txt": txt}),
        ("ok-gray", {"png": encode(Image.fromarray(gray, mode="L")), "txt": txt}),
        ("ok-palette", {"png": encode(palette_img), "txt": txt}),
        ("ok-gray16", {"png": encode(Image.fromarray(gray16)), "txt": txt}),
        ("ok-cmyk", {"jpg": encode(cmyk, "JPEG", quality=100), "txt": txt}),
        ("ok-latin1", {"png": encode(noise_rgb(3, 8)), "txt": "caf\u00e9 cr\u00e8me".encode("latin-1")}),
    ]
    skipped = {
        "bad-corrupt": "corrupt",
        "bad-truncated": "truncated",
        "bad-empty": "empty",
        "bad-huge": "too_large",
        "bad-noimage": "missing_image",
    }
    expected = {
        "ok-rgba": np.round(rgba[:, :, :3].astype(np.float64) * rgba[:, :, 3:] / 255).astype(np.uint8),
        "ok-gray": np.repeat(gray[:, :, None], 3, axis=2),
        "ok-palette": np.asarray(palette_img.convert("RGB")),
        "ok-gray16": np.repeat((gray16 >> 8).astype(np.uint8)[:, :, None], 3, axis=2),
        "ok-cmyk": np.full((8, 8, 3), 255, np.uint8),
    }
    return records, skipped, expected


def good_records(n: int, prefix: str = "good") -> list[tuple[str, dict[str, bytes]]]:
    return [
        (
            f"{prefix}-{i:04d}",
            {
                "png": encode(noise_rgb(100 + i, 8)),
                "txt": f"caption {i}".encode(),
                "json": json.dumps({"i": i}).encode(),
            },
        )
        for i in range(n)
    ]
