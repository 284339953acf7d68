"""A user's own images: a folder of image files with captions.

Captions come from, in order of preference:

1. `metadata.jsonl` files (the Hugging Face imagefolder convention): one JSON object per line
   with `file_name` (relative to the metadata file's folder) and `text` (or the configured text
   column, or `caption`); other fields of the line become the sample's `meta`;
2. a sidecar text file beside the image: `cat.png` -> `cat.txt`;
3. otherwise the caption is "" and the sample is counted as repaired (`missing_caption`).

Non-UTF-8 captions are decoded with replacement characters and counted (`caption_utf8`).
Images that cannot be decoded are skipped and counted. Keys are the relative path without
extension, with dots replaced by "_" (dots would break webdataset keys).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.images import BadImageError, decode_image
from data.sample import Sample
from data.skips import SkipCounter

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
)
METADATA_FILE = "metadata.jsonl"


@dataclass(frozen=True)
class FolderItem:
    """One image of a folder and where its caption comes from (`caption` None: use `caption_path`)."""

    key: str
    image_path: Path
    caption: str | None = None
    caption_path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    caption_repaired: bool = False


def decode_text(raw: bytes, key: str, counter: SkipCounter | None) -> str:
    """UTF-8 text; invalid bytes become U+FFFD and the sample is counted as `caption_utf8`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if counter is not None:
            counter.repair(key, "caption_utf8")
        return raw.decode("utf-8", errors="replace")


def _read_metadata(
    folder: Path, text_column: str, counter: SkipCounter | None
) -> dict[Path, tuple[str, dict[str, Any], bool]]:
    """Map image path -> (caption, extra fields, caption_repaired) from all metadata.jsonl files."""
    entries: dict[Path, tuple[str, dict[str, Any], bool]] = {}
    for meta_file in sorted(folder.rglob(METADATA_FILE)):
        for lineno, raw in enumerate(meta_file.read_bytes().splitlines(), start=1):
            if not raw.strip():
                continue
            where = f"{meta_file.name}:{lineno}"
            try:
                line = raw.decode("utf-8")
                repaired = False
            except UnicodeDecodeError:
                line, repaired = raw.decode("utf-8", errors="replace"), True
            try:
                row = json.loads(line)
                file_name = row["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError):
                if counter is not None:
                    counter.repair(where, "bad_metadata_line")
                continue
            text = row.get(text_column, row.get("caption", row.get("text")))
            extra = {k: v for k, v in row.items() if k not in ("file_name", text_column, "caption", "text")}
            caption = "" if text is None else str(text)
            entries[(meta_file.parent / file_name).resolve()] = (caption, extra, repaired)
    return entries


def _key_for(relative: Path) -> str:
    return relative.with_suffix("").as_posix().replace(".", "_")


def list_folder(
    path: str | Path, text_column: str = "text", skip_counter: SkipCounter | None = None
) -> list[FolderItem]:
    """All images under `path` (recursively, sorted, hidden files ignored) with caption sources."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    metadata = _read_metadata(folder, text_column, skip_counter)
    items: list[FolderItem] = []
    seen: set[str] = set()
    for image_path in sorted(folder.rglob("*")):
        relative = image_path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not image_path.is_file():
            continue
        if image_path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        key = _key_for(relative)
        if key in seen:
            key = f"{key}_{image_path.suffix.lower().lstrip('.')}"
        seen.add(key)
        entry = metadata.get(image_path.resolve())
        if entry is not None:
            caption, extra, repaired = entry
            items.append(FolderItem(key, image_path, caption, None, extra, repaired))
        else:
            sidecar = image_path.with_suffix(".txt")
            items.append(FolderItem(key, image_path, None, sidecar if sidecar.is_file() else None))
    return items


def load_folder_item(item: FolderItem, skip_counter: SkipCounter | None = None) -> Sample | None:
    """Decode one folder item into a Sample, or count it as skipped and return None."""
    try:
        image = decode_image(item.image_path)
    except BadImageError as err:
        if skip_counter is not None:
            skip_counter.skip(item.key, err.reason, err.detail)
        return None
    if item.caption is not None:
        caption = item.caption
        if item.caption_repaired and skip_counter is not None:
            skip_counter.repair(item.key, "caption_utf8")
    elif item.caption_path is not None:
        caption = decode_text(item.caption_path.read_bytes(), item.key, skip_counter).strip()
    else:
        caption = ""
        if skip_counter is not None:
            skip_counter.repair(item.key, "missing_caption")
    return Sample(item.key, image, caption, dict(item.meta))


def iter_folder(
    path: str | Path, text_column: str = "text", skip_counter: SkipCounter | None = None
) -> Iterator[Sample]:
    """Samples of an image folder in sorted order; bad images are skipped and counted."""
    counter = skip_counter if skip_counter is not None else SkipCounter()
    for item in list_folder(path, text_column, counter):
        sample = load_folder_item(item, counter)
        if sample is not None:
            yield sample
