"""Reading image-text data from any supported format into `Sample`s, never crashing on bad data.

`open_source` detects the format of `path`:

* a `datasets.Dataset` (or `DatasetDict`: its "train" split, or its only split) object;
* a directory written by `save_to_disk` (has `state.json` or `dataset_dict.json`): HF;
* a directory containing `*.tar` shards, a single `.tar` file, a brace pattern
  (`shards/shard-{000000..000009}.tar`), a glob, or a list of tar paths/URLs: webdataset;
* any other directory: an image folder (see `data.folder`).

`pipe:` URLs run a shell command, so they are refused unless `allow_pipe=True`.

Bad samples are skipped and counted in a `SkipCounter` (corrupt, truncated or 0-byte images,
unsupported modes, images above the pixel limit, samples without an image, unreadable shards);
fixable ones are converted (RGBA, L, P, I;16, CMYK, ... -> RGB) or repaired and counted
(non-UTF-8 captions decoded with replacement characters, missing captions, bad meta JSON).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from data.folder import FolderItem, decode_text, list_folder, load_folder_item
from data.images import BadImageError, decode_image, to_rgb
from data.sample import Sample
from data.skips import SkipCounter

IMAGE_EXTS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
TEXT_EXTS: tuple[str, ...] = ("txt", "caption", "text")

PathLike = str | os.PathLike


def _is_pattern(url: str) -> bool:
    return any(ch in url for ch in "*?[") or ("{" in url and "}" in url)


def _check_pipe(url: str, allow_pipe: bool) -> None:
    if url.startswith("pipe:") and not allow_pipe:
        raise ValueError(
            f"refusing to open {url!r}: 'pipe:' URLs run a shell command; pass allow_pipe=True "
            "if you trust this source"
        )


def expand_urls(urls: str | Sequence[str], allow_pipe: bool = False) -> list[str]:
    """Expand brace patterns and globs into a list of shard URLs (refusing `pipe:` by default)."""
    from braceexpand import braceexpand

    items = [urls] if isinstance(urls, str) else list(urls)
    expanded: list[str] = []
    for item in items:
        item = os.fspath(item)
        _check_pipe(item, allow_pipe)
        for url in braceexpand(item) if "{" in item else [item]:
            _check_pipe(url, allow_pipe)
            if "://" not in url and not url.startswith("pipe:") and any(ch in url for ch in "*?["):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise FileNotFoundError(f"no files match {url!r}")
                expanded.extend(matches)
            else:
                expanded.append(url)
    if not expanded:
        raise FileNotFoundError(f"no shards in {urls!r}")
    return expanded


@contextmanager
def _open_stream(url: str, allow_pipe: bool) -> Iterator[IO[bytes]]:
    """A binary stream for a local path, a `file://`/remote URL (webdataset's gopen) or `pipe:`."""
    _check_pipe(url, allow_pipe)
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            if proc.poll() is None:
                proc.terminate()
            proc.wait()
        return
    if "://" in url and not url.startswith("file://"):
        from webdataset.gopen import gopen

        with gopen(url, "rb") as stream:
            yield stream
        return
    with open(url.removeprefix("file://"), "rb") as stream:
        yield stream


def iter_tar_records(
    url: str, counter: SkipCounter | None = None, allow_pipe: bool = False
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group the files of one tar shard by webdataset key: yields (key, {extension: bytes}).

    The key is the member path up to the first dot of its file name. A shard that cannot be
    opened or is truncated is counted (`bad_shard`) and its remaining samples are dropped.
    """
    _check_pipe(url, allow_pipe)
    key: str | None = None
    files: dict[str, bytes] = {}
    try:
        with _open_stream(url, allow_pipe) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                stem, dot, ext = name.partition(".")
                if not dot or stem.startswith("__") or name.startswith("."):
                    continue
                member_key = f"{folder}/{stem}" if folder else stem
                if member_key != key:
                    if key is not None:
                        yield key, files
                    key, files = member_key, {}
                files[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        if counter is not None:
            counter.skip(key or url, "bad_shard", f"{url}: {err}")
        return
    if key is not None:
        yield key, files


def _decode_meta(raw: bytes | None, key: str, counter: SkipCounter | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        meta = json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        if counter is not None:
            counter.repair(key, "bad_meta")
        return {}
    return meta if isinstance(meta, dict) else {"value": meta}


def _missing_caption(key: str, counter: SkipCounter | None) -> str:
    if counter is not None:
        counter.repair(key, "missing_caption")
    return ""


def record_to_sample(
    key: str,
    files: dict[str, bytes],
    counter: SkipCounter | None = None,
    image_column: str = "image",
    text_column: str = "text",
) -> Sample | None:
    """Turn one webdataset record into a Sample, or count it as skipped and return None."""
    image_ext = next((e for e in (image_column, *IMAGE_EXTS) if e in files), None)
    if image_ext is None:
        if counter is not None:
            counter.skip(key, "missing_image", f"files: {sorted(files)}")
        return None
    try:
        image = decode_image(files[image_ext])
    except BadImageError as err:
        if counter is not None:
            counter.skip(key, err.reason, err.detail)
        return None
    text_ext = next((e for e in (text_column, *TEXT_EXTS) if e in files), None)
    caption = (
        decode_text(files[text_ext], key, counter).strip() if text_ext else _missing_caption(key, counter)
    )
    return Sample(key, image, caption, _decode_meta(files.get("json"), key, counter))


@dataclass
class TarSource:
    """Webdataset shards: read sequentially, one shard after another."""

    urls: list[str]
    allow_pipe: bool = False
    image_column: str = "image"
    text_column: str = "text"

    def records(
        self, urls: Sequence[str], counter: SkipCounter | None
    ) -> Iterator[tuple[str, dict[str, bytes]]]:
        for url in urls:
            yield from iter_tar_records(url, counter, self.allow_pipe)

    def to_sample(self, record: tuple[str, dict[str, bytes]], counter: SkipCounter | None) -> Sample | None:
        return record_to_sample(record[0], record[1], counter, self.image_column, self.text_column)


@dataclass
class HFSource:
    """A `datasets.Dataset` with random access; images are decoded here, robustly."""

    dataset: Any
    image_column: str = "image"
    text_column: str = "text"

    def __post_init__(self) -> None:
        import datasets

        columns = self.dataset.column_names
        for column in (self.image_column, self.text_column):
            if column not in columns:
                raise ValueError(f"column {column!r} not in dataset columns {columns}")
        feature = self.dataset.features[self.image_column]
        if isinstance(feature, datasets.Image) and feature.decode:
            self.dataset = self.dataset.cast_column(self.image_column, datasets.Image(decode=False))

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int, counter: SkipCounter | None) -> Sample | None:
        row = self.dataset[int(index)]
        key = str(row["key"]) if row.get("key") is not None else f"{index:09d}"
        try:
            image = _hf_image(row[self.image_column])
        except BadImageError as err:
            if counter is not None:
                counter.skip(key, err.reason, err.detail)
            return None
        text = row[self.text_column]
        if isinstance(text, bytes):
            caption = decode_text(text, key, counter)
        elif text is None:
            caption = _missing_caption(key, counter)
        else:
            caption = str(text)
        meta = row.get("meta")
        if isinstance(meta, str):
            meta = _decode_meta(meta.encode("utf-8"), key, counter)
        return Sample(key, image, caption, meta if isinstance(meta, dict) else {})


def _hf_image(value: Any) -> Image.Image:
    """Decode an HF image cell: {"bytes", "path"}, a PIL image, or an array."""
    if value is None:
        raise BadImageError("missing_image", "image cell is empty")
    if isinstance(value, dict):
        if value.get("bytes"):
            return decode_image(value["bytes"])
        if value.get("path"):
            return decode_image(value["path"])
        raise BadImageError("empty", "image cell has neither bytes nor path")
    if isinstance(value, Image.Image):
        try:
            value.load()
        except (OSError, ValueError) as err:
            raise BadImageError("corrupt", str(err)) from err
        return to_rgb(value)
    if isinstance(value, bytes):
        return decode_image(value)
    return to_rgb(np.asarray(value))


@dataclass
class FolderSource:
    """An image folder with random access."""

    items: list[FolderItem]

    def __len__(self) -> int:
        return len(self.items)

    def get(self, index: int, counter: SkipCounter | None) -> Sample | None:
        return load_folder_item(self.items[int(index)], counter)


Source = TarSource | HFSource | FolderSource


def _single_split(loaded: Any) -> Any:
    """A `Dataset` as is; of a `DatasetDict` its "train" split, or its only split."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            return loaded["train"]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise ValueError(
            f"the DatasetDict has several splits {list(loaded)}; pass the Dataset of one of them"
        )
    if not isinstance(loaded, datasets.Dataset):
        raise ValueError(f"expected a datasets.Dataset or DatasetDict, got {type(loaded).__name__}")
    return loaded


def _load_hf(path: Path) -> Any:
    import datasets

    return _single_split(datasets.load_from_disk(str(path)))


def open_source(
    path: Any,
    *,
    image_column: str = "image",
    text_column: str = "text",
    allow_pipe: bool = False,
    skip_counter: SkipCounter | None = None,
) -> Source:
    """Detect the format of `path` (see the module docstring) and return its source."""
    if type(path).__module__.split(".")[0] == "datasets":
        return HFSource(_single_split(path), image_column, text_column)
    if isinstance(path, (list, tuple)):
        return TarSource(expand_urls(path, allow_pipe), allow_pipe, image_column, text_column)
    url = os.fspath(path)
    _check_pipe(url, allow_pipe)
    remote = url.startswith("pipe:") or "://" in url
    if remote or _is_pattern(url) or url.endswith((".tar", ".tar.gz", ".tgz")):
        if not (remote or _is_pattern(url)) and not Path(url).is_file():
            raise FileNotFoundError(f"shard {url} does not exist")
        return TarSource(expand_urls(url, allow_pipe), allow_pipe, image_column, text_column)
    folder = Path(url)
    if not folder.exists():
        raise FileNotFoundError(
            f"{folder} does not exist (expected a dataset directory, shard pattern or folder)"
        )
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file but not a .tar shard")
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
        return HFSource(_load_hf(folder), image_column, text_column)
    shards = sorted(str(p) for p in folder.glob("*.tar"))
    if shards:
        return TarSource(shards, allow_pipe, image_column, text_column)
    return FolderSource(list_folder(folder, text_column, skip_counter))


def iter_source(source: Source, counter: SkipCounter | None) -> Iterator[Sample]:
    """All samples of a source in its natural order."""
    if isinstance(source, TarSource):
        for record in source.records(source.urls, counter):
            sample = source.to_sample(record, counter)
            if sample is not None:
                yield sample
        return
    for index in range(len(source)):
        sample = source.get(index, counter)
        if sample is not None:
            yield sample


def open_samples(
    path: Any,
    *,
    image_column: str = "image",
    text_column: str = "text",
    allow_pipe: bool = False,
    skip_counter: SkipCounter | None = None,
) -> Iterator[Sample]:
    """Iterate the samples of any supported dataset (format detected, bad samples skipped+counted).

    The format is detected eagerly, so a missing path or a refused `pipe:` URL raises here,
    not on the first `next()`.
    """
    counter = skip_counter if skip_counter is not None else SkipCounter()
    source = open_source(
        path, image_column=image_column, text_column=text_column, allow_pipe=allow_pipe, skip_counter=counter
    )
    return iter_source(source, counter)
