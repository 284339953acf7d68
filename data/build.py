"""Build a dataset on disk: `python -m data.build --dataset shapes --num 50000 --format webdataset --out DIR`.

`--dataset` is one of the embedded datasets (shapes, digits, photos) or the path of an image
folder (captions from metadata.jsonl or sidecar .txt files; images are resized and
centre-cropped to `--resolution` with bicubic filtering). Arguments are validated before any
work is done. The output directory must be absent or empty, unless `--overwrite` is given and
it holds a previous build (a `dataset_info.json`), which is then replaced.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from data.sample import Sample
from data.skips import SkipCounter

DATASETS: tuple[str, ...] = ("shapes", "digits", "photos")
FORMATS: tuple[str, ...] = ("webdataset", "hf")
SPLITS: tuple[str, ...] = ("train", "test")
MIN_RESOLUTION, MAX_RESOLUTION = 8, 1024


@dataclass(frozen=True)
class BuildResult:
    """What a build wrote."""

    count: int
    skipped: int
    out: str
    format: str
    shards: tuple[str, ...] = ()


def validate(
    dataset: str,
    num: int,
    resolution: int,
    format: str,
    out: str | Path,
    shard_size: int,
    split: str,
    overwrite: bool,
) -> None:
    """Raise ValueError with a message saying what is allowed, before any work is done."""
    if dataset not in DATASETS and not Path(dataset).is_dir():
        raise ValueError(
            f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)} or the path of an image folder"
        )
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise ValueError(
            f"--resolution must be between {MIN_RESOLUTION} and {MAX_RESOLUTION}, got {resolution}"
        )
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")
    if shard_size < 1:
        raise ValueError(f"--shard_size must be >= 1, got {shard_size}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} exists and is a file")
        if any(out.iterdir()):
            if not overwrite:
                raise ValueError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
            if not (out / "dataset_info.json").is_file():
                raise ValueError(
                    f"refusing to overwrite {out}: it does not look like a dataset built by data.build "
                    "(no dataset_info.json); remove it yourself or choose another --out"
                )


def iter_dataset(
    dataset: str, num: int, resolution: int, seed: int, split: str, counter: SkipCounter
) -> Iterator[Sample]:
    """The first `num` samples of an embedded dataset or image folder, at `resolution`."""
    if dataset == "shapes":
        from data.shapes import generate_shapes

        return generate_shapes(num, resolution, seed, split=split)
    if dataset == "digits":
        from data.digits import generate_digits

        return generate_digits(num, resolution, seed, split=split)
    if dataset == "photos":
        from data.photos import generate_photos

        return generate_photos(num, resolution, seed, split=split)
    from data.folder import iter_folder
    from data.images import resize_center_crop

    resized = (
        Sample(s.key, resize_center_crop(s.image, resolution, "bicubic"), s.caption, s.meta)
        for s in iter_folder(dataset, skip_counter=counter)
    )
    return itertools.islice(resized, num)


def build(
    dataset: str,
    num: int,
    resolution: int,
    format: str,
    out: str | Path,
    seed: int = 0,
    *,
    shard_size: int = 5000,
    split: str = "train",
    overwrite: bool = False,
    progress: bool = True,
) -> BuildResult:
    """Generate (or read) `num` samples and write them in `format` to `out`."""
    from tqdm import tqdm

    validate(dataset, num, resolution, format, out, shard_size, split, overwrite)
    out = Path(out)
    if overwrite and out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    counter = SkipCounter()
    samples = iter_dataset(dataset, num, resolution, seed, split, counter)
    bar = tqdm(samples, total=num, desc=f"building {Path(dataset).name}", unit="img", disable=not progress)
    source = dataset if dataset in DATASETS else str(Path(dataset).resolve())
    info = {"source": source, "resolution": resolution, "seed": seed, "split": split, "requested": num}
    if format == "webdataset":
        from data.writers import write_webdataset

        shards = write_webdataset(bar, out, shard_size, info=info, skip_counter=counter)
    else:
        from data.writers import write_hf

        write_hf(bar, out, info=info, skip_counter=counter)
        shards = []
    bar.close()
    from data.writers import read_dataset_info

    count = int(read_dataset_info(out)["num"])
    return BuildResult(count, counter.total, str(out), format, tuple(shards))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data.build", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", required=True, help=f"one of {', '.join(DATASETS)}, or an image folder PATH"
    )
    parser.add_argument("--num", type=int, required=True, help="number of samples (>= 1)")
    parser.add_argument(
        "--resolution",
        type=int,
        default=32,
        help=f"image side in pixels ({MIN_RESOLUTION}..{MAX_RESOLUTION})",
    )
    parser.add_argument("--format", choices=FORMATS, default="webdataset")
    parser.add_argument("--out", required=True, help="output directory (absent or empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard_size", type=int, default=5000, help="samples per tar shard (webdataset)")
    parser.add_argument("--split", choices=SPLITS, default="train", help="digits: disjoint source digits")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous build in --out")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = build(
            args.dataset,
            args.num,
            args.resolution,
            args.format,
            args.out,
            args.seed,
            shard_size=args.shard_size,
            split=args.split,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shards = f", {len(result.shards)} shards" if result.shards else ""
    print(
        f"wrote {result.count} samples ({result.skipped} skipped) to {result.out} [{result.format}{shards}]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
