"""Writing samples as webdataset tar shards or as a Hugging Face `save_to_disk` dataset.

Both writers are atomic at the level a crash can see: a shard is written under a temporary
name (`shard-000000.tar.tmp`) and renamed when complete, the HF dataset is saved to a temporary
directory that is renamed at the end, and `dataset_info.json` (written last, atomically) marks
a complete build. Images are stored as PNG, so pixels round-trip exactly.

`dataset_info.json` holds: source, num, resolution, seed, format, shards (webdataset),
skipped/repaired counts, created_by. For HF, these keys are merged into the `dataset_info.json`
that `save_to_disk` writes (`datasets` ignores keys it does not know).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from data.sample import Sample
from data.skips import SkipCounter

INFO_FILE = "dataset_info.json"
SHARD_PATTERN = "shard-%06d.tar"


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG bytes of an image."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def created_by() -> str:
    """Package name and version for provenance."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"mmgen-toolkit {version('mmgen-toolkit')} (data.writers)"
    except PackageNotFoundError:
        return "mmgen-toolkit (data.writers)"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory")


def _info(
    base: Mapping[str, Any] | None, fmt: str, num: int, first: Sample | None, counter: SkipCounter | None
):
    info: dict[str, Any] = dict(base or {})
    info["format"] = fmt
    info["num"] = num
    if "resolution" not in info and first is not None:
        info["resolution"] = (
            first.image.width if first.image.width == first.image.height else list(first.image.size)
        )
    if counter is not None:
        info["skipped"] = dict(counter.skipped)
        info["repaired"] = dict(counter.repaired)
    info["created_by"] = created_by()
    return info


def _webdataset_key(key: str) -> str:
    # webdataset splits "key.ext" at the first dot of the file name
    return key.replace(".", "_")


def write_webdataset(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike,
    shard_size: int = 5000,
    *,
    info: Mapping[str, Any] | None = None,
    skip_counter: SkipCounter | None = None,
) -> list[str]:
    """Write `key.png`, `key.txt`, `key.json` records into `shard-NNNNNN.tar` files; return their paths.

    `out_dir` must be absent or empty. `info` adds fields to `dataset_info.json`;
    `skip_counter` (of the reader that produced `samples`) adds its counts.
    """
    import webdataset as wds

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    _prepare_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    state = {"aborted": False}

    def finish_shard(tmp_name: str) -> None:
        final = tmp_name.removesuffix(".tmp")
        if state["aborted"] or writer.count == 0:
            os.unlink(tmp_name)
        else:
            os.replace(tmp_name, final)
            shards.append(final)

    writer = wds.ShardWriter(
        str(out / SHARD_PATTERN) + ".tmp",
        maxcount=shard_size,
        post=finish_shard,
        verbose=0,
        encoder=False,
        mtime=0,
    )
    num, first, keys = 0, None, set()
    try:
        for sample in samples:
            key = _webdataset_key(sample.key)
            if key in keys:
                raise ValueError(f"duplicate sample key {key!r}")
            keys.add(key)
            record = {
                "__key__": key,
                "png": encode_png(sample.image),
                "txt": sample.caption.encode("utf-8"),
                "json": json.dumps(sample.meta, sort_keys=True).encode("utf-8"),
            }
            writer.write(record)
            first = first or sample
            num += 1
    except BaseException:
        state["aborted"] = True
        writer.close()
        raise
    writer.close()
    full = _info(info, "webdataset", num, first, skip_counter)
    full["shards"] = [Path(s).name for s in shards]
    full["shard_size"] = shard_size
    _atomic_write_text(out / INFO_FILE, json.dumps(full, indent=2, sort_keys=True))
    return shards


def write_hf(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike,
    *,
    info: Mapping[str, Any] | None = None,
    skip_counter: SkipCounter | None = None,
) -> str:
    """Save samples as a `datasets.Dataset` (columns key, image, text, meta as JSON) with `save_to_disk`.

    Written to a temporary directory beside `out_dir` and renamed when complete; returns `out_dir`.
    """
    import datasets

    out = Path(out_dir)
    _prepare_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    features = datasets.Features(
        {
            "key": datasets.Value("string"),
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "meta": datasets.Value("string"),
        }
    )
    stats: dict[str, Any] = {"num": 0, "first": None}

    def rows():
        for sample in samples:
            stats["num"] += 1
            stats["first"] = stats["first"] or sample
            yield {
                "key": sample.key,
                "image": {"bytes": encode_png(sample.image), "path": None},
                "text": sample.caption,
                "meta": json.dumps(sample.meta, sort_keys=True),
            }

    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the caller shows its own progress
    try:
        try:
            dataset = datasets.Dataset.from_generator(
                rows,
                features=features,
                cache_dir=str(work / "cache"),
                fingerprint=f"mmgen-{os.getpid()}-{id(rows)}",
            )
        except datasets.exceptions.DatasetGenerationError as err:
            if err.__cause__ is None:
                raise
            raise err.__cause__ from None  # the error of the sample source, not the wrapper
        if stats["num"] == 0:
            raise ValueError("no samples to write")
        saved = work / "dataset"
        dataset.save_to_disk(str(saved))
        del dataset
        info_path = saved / INFO_FILE
        merged = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
        merged.update(_info(info, "hf", stats["num"], stats["first"], skip_counter))
        _atomic_write_text(info_path, json.dumps(merged, indent=2))
        if out.exists():
            out.rmdir()
        os.replace(saved, out)
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()
        shutil.rmtree(work, ignore_errors=True)
    return str(out)


def read_dataset_info(path: str | os.PathLike) -> dict[str, Any]:
    """The `dataset_info.json` of a built dataset directory."""
    return json.loads((Path(path) / INFO_FILE).read_text(encoding="utf-8"))
