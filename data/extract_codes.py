"""Pre-extract image tokens: `python -m data.extract_codes --tokenizer DIR --dataset shapes --out DIR ...`.

Encodes `--num` images of `--dataset` (shapes, digits, photos, or a dataset PATH that
`data.readers` can open) at `--resolution` with the frozen Stage-1 tokenizer in `--tokenizer` and
writes them with their captions as a codes directory (`data.codes`): tar shards plus
`codes_meta.json`, which records the tokenizer's identity so that `data.codes.load_codes` refuses
codes made by another tokenizer. Arguments are validated before any work is done.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from data.codes import check_out_dir, read_codes_meta, write_codes
from data.readers import _is_pattern
from data.sources import EMBEDDED, check_source, samples_tensor

if TYPE_CHECKING:
    from tokenizers_mm.modeling import ImageTokenizer

SPLITS: tuple[str, ...] = ("train", "test")


def validate(
    tokenizer: str | os.PathLike | ImageTokenizer,
    dataset: str,
    num: int,
    resolution: int,
    out: str | os.PathLike,
    split: str,
    batch_size: int,
    shard_size: int,
    overwrite: bool,
    allow_pipe: bool = False,
) -> None:
    """Raise ValueError (FileExistsError for `out`) saying what is allowed, before any work is done."""
    for name, value in (
        ("num", num),
        ("resolution", resolution),
        ("batch_size", batch_size),
        ("shard_size", shard_size),
    ):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    check_source(dataset, allow_pipe, what="dataset")
    if isinstance(tokenizer, (str, os.PathLike)):
        folder = Path(tokenizer)
        if not folder.is_dir():
            raise ValueError(f"--tokenizer {folder} is not a directory (expected a saved Stage-1 tokenizer)")
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"--tokenizer {folder} has no config.json; pass a folder written by "
                "ImageTokenizer.save_pretrained (e.g. the output of tokenizers_mm.train)"
            )
    check_out_dir(out, overwrite)


def load_tokenizer(tokenizer: str | os.PathLike | ImageTokenizer) -> ImageTokenizer:
    """The tokenizer itself, or loaded from its folder (absolute path as its name_or_path)."""
    from tokenizers_mm.modeling import ImageTokenizer

    if isinstance(tokenizer, ImageTokenizer):
        return tokenizer
    folder = Path(tokenizer).resolve()
    try:
        model = ImageTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"could not load a tokenizer from {folder}: {err}") from err
    return model


def check_resolution(model: ImageTokenizer, resolution: int) -> None:
    """The encoder takes any multiple of its downsampling factor; say so otherwise."""
    factor, trained = model.config.downsample_factor, model.config.resolution
    if resolution % factor:
        raise ValueError(
            f"--resolution {resolution} is not a multiple of the tokenizer's downsampling factor {factor} "
            f"(it was trained at {trained}; e.g. use {trained})"
        )


@torch.no_grad()
def encode_images(
    model: ImageTokenizer, pixels: torch.Tensor, batch_size: int, progress: bool = True
) -> torch.Tensor:
    """uint8 pixels (N, 3, R, R) → tokens on the CPU: (N, h, w) long or (N, h, w, c) float32."""
    from tqdm import tqdm

    param = next(model.parameters())
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    try:
        with tqdm(total=len(pixels), desc="extracting codes", unit="img", disable=not progress) as bar:
            for start in range(0, len(pixels), batch_size):
                batch = pixels[start : start + batch_size].to(param.device)
                batch = batch.to(param.dtype).div(127.5).sub(1.0)  # uint8 → [-1, 1]
                tokens = model.encode(batch)  # (b, h, w) or (b, h, w, c)
                chunks.append(tokens.cpu() if not tokens.is_floating_point() else tokens.float().cpu())
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return torch.cat(chunks)  # (N, h, w) or (N, h, w, c)


def extract_codes(
    tokenizer: str | os.PathLike | ImageTokenizer,
    dataset: str,
    num: int,
    resolution: int,
    out: str | os.PathLike,
    split: str = "train",
    seed: int = 0,
    batch_size: int = 256,
    shard_size: int = 10000,
    overwrite: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    allow_pipe: bool = False,
) -> Path:
    """Encode `num` images of `dataset` with `tokenizer` (a folder or a model) and write them to `out`.

    `device` moves a tokenizer loaded from a folder (default: CPU); a model passed in is used where it is.
    A `pipe:` dataset URL (a shell command) is refused unless `allow_pipe`.
    Returns `out`, whose `codes_meta.json` holds the tokenizer identity and these arguments.
    """
    from tokenizers_mm.identity import tokenizer_identity

    validate(tokenizer, dataset, num, resolution, out, split, batch_size, shard_size, overwrite, allow_pipe)
    model = load_tokenizer(tokenizer)
    if model is not tokenizer and device is not None:
        model = model.to(device)
    check_resolution(model, resolution)
    pixels, captions, keys, counter = samples_tensor(dataset, num, resolution, seed, split, allow_pipe)
    tokens = encode_images(model, pixels, batch_size, progress)
    identity = tokenizer_identity(model, resolution)
    url = _is_pattern(dataset) or "://" in dataset or dataset.startswith("pipe:")
    source = dataset if dataset in EMBEDDED or url else str(Path(dataset).resolve())
    extra_meta: dict[str, Any] = {
        "source": source,
        "requested": num,
        "resolution": resolution,
        "seed": seed,
        "split": split,
        "tokenizer": identity["name_or_path"],
        "skipped": counter.as_dict(),
        "skip_summary": counter.summary(),
    }
    return write_codes(out, keys, captions, tokens, identity, shard_size, extra_meta, overwrite)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data.extract_codes", description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="folder of a saved Stage-1 tokenizer")
    parser.add_argument("--dataset", required=True, help=f"one of {', '.join(EMBEDDED)}, or a dataset PATH")
    parser.add_argument("--num", type=int, required=True, help="number of images (>= 1)")
    parser.add_argument(
        "--resolution",
        type=int,
        required=True,
        help="image side in pixels (a multiple of the tokenizer's downsampling factor)",
    )
    parser.add_argument("--out", required=True, help="output directory (absent or empty)")
    parser.add_argument("--split", choices=SPLITS, default="train", help="embedded datasets: which split")
    parser.add_argument("--seed", type=int, default=0, help="embedded datasets: generation seed")
    parser.add_argument("--batch_size", type=int, default=256, help="images per encoder batch (>= 1)")
    parser.add_argument("--shard_size", type=int, default=10000, help="samples per tar shard (>= 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier codes in --out")
    parser.add_argument("--device", default=None, help="torch device for the tokenizer (default: cpu)")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--allow_pipe", action="store_true", help="accept a `pipe:CMD` dataset URL (runs CMD in a shell)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = extract_codes(
            args.tokenizer,
            args.dataset,
            args.num,
            args.resolution,
            args.out,
            split=args.split,
            seed=args.seed,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            device=args.device,
            allow_pipe=args.allow_pipe,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = read_codes_meta(out)
    grid = "x".join(str(n) for n in meta["grid"])
    print(
        f"wrote {meta['count']} {meta['kind']} ({grid} tokens, {meta['dtype']}) to {out} "
        f"[{len(meta['shards'])} shards]"
    )
    identity = meta["identity"]
    print(f"tokenizer {identity['name_or_path']} (fingerprint {identity['fingerprint'][:16]}…)")
    print(meta["extra_meta"]["skip_summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
