"""Streaming webdataset shards: images/s and MB/s of the training loader, by DataLoader workers (issue 6).

    python benchmarks/bench_streaming.py                          # 2,000 shapes at 256 px, 0/1/2 workers
    python benchmarks/bench_streaming.py --workers 0 4 8 16       # a GPU machine's cores
    python benchmarks/bench_streaming.py --shards 'DIR_OR_URLS'   # your own shards (local or pipe:)
    python benchmarks/bench_streaming.py --quick                  # seconds, for CI

What the Stage-1 trainer runs when ``in_memory: false``: ``data.torch_dataset.ImageTextDataset`` (tar
reading, image decoding, skip counting, buffer shuffle, resize, to a float tensor in [-1, 1]) under a
``torch.utils.data.DataLoader`` with ``--batch`` images per batch. Without ``--shards``, the embedded
shapes data is first written as webdataset shards (``data.build``, PNG) to a temporary folder, so the
reads come from the local disk (page cache after the first pass). Each worker count reads one epoch
after one untimed warm-up epoch; images/s and shard MB/s are reported per count.

Object storage adds the network: with ``pipe:curl ...`` URLs (``--allow_pipe``) a loader needs about
``images/s × MB per image`` of bandwidth, which the table's MB/s column gives for the local case. Prints a
table and one JSON line ``{"bench": "streaming", ...}``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from bench_common import emit_json

from data.build import build
from data.readers import TarSource
from data.torch_dataset import ImageTextDataset


def epoch_seconds(dataset: ImageTextDataset, batch: int, workers: int) -> tuple[float, int]:
    """Seconds to read one epoch, and the number of images read."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
    start, images = time.perf_counter(), 0
    for item in loader:
        images += item["pixels"].shape[0]
    return time.perf_counter() - start, images


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few small images, 0 and 1 workers (seconds, for CI)")
    p.add_argument("--shards", default=None, help="shards to read (default: build shapes shards first)")
    p.add_argument("--allow_pipe", action="store_true", help="allow pipe: URLs in --shards")
    p.add_argument("--num", type=int, default=None, help="images to build (default 2000, quick 64)")
    p.add_argument("--resolution", type=int, default=None, help="image side (default 256, quick 32)")
    p.add_argument("--shard_size", type=int, default=None, help="images per built shard (default 250)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default 0 1 2)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    num = args.num or (64 if args.quick else 2000)
    resolution = args.resolution or (32 if args.quick else 256)
    workers = args.workers or ([0, 1] if args.quick else [0, 1, 2])

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            shards = str(Path(tmp) / "shards")
            build(
                "shapes",
                num,
                resolution,
                "webdataset",
                shards,
                shard_size=args.shard_size or max(8, num // 8),
            )
        dataset = ImageTextDataset(shards, resolution, resample="bicubic", allow_pipe=args.allow_pipe)
        if not isinstance(dataset.source, TarSource):
            raise SystemExit(f"--shards must name webdataset tar shards, got {shards!r}")
        urls = list(dataset.source.urls)
        local = [u for u in urls if os.path.exists(u)]
        megabytes = sum(os.path.getsize(u) for u in local) / 1e6 if len(local) == len(urls) else None
        epoch_seconds(dataset, args.batch, 0)  # warm-up: the page cache, imports
        cases = []
        for w in workers:
            seconds, images = epoch_seconds(dataset, args.batch, w)
            case = {"workers": w, "images": images, "seconds": round(seconds, 3)}
            case["images_per_s"] = round(images / seconds, 1)
            if megabytes is not None:
                case["mb_per_s"] = round(megabytes / seconds, 1)
            cases.append(case)

    results: dict[str, object] = {
        "bench": "streaming",
        "quick": args.quick,
        "resolution": resolution,
        "shards": len(urls),
        "shard_mb": None if megabytes is None else round(megabytes, 1),
        "cpu_count": os.cpu_count(),
        "batch": args.batch,
        "cases": cases,
    }
    print(f"{'workers':>7}{'images':>8}{'s':>8}{'images/s':>10}{'MB/s':>8}")
    for c in cases:
        print(
            f"{c['workers']:>7}{c['images']:>8}{c['seconds']:>8.2f}{c['images_per_s']:>10.0f}"
            f"{c.get('mb_per_s', float('nan')):>8.1f}"
        )
    print(f"{len(urls)} shards, {results['shard_mb']} MB, {resolution} px, batch {args.batch}")
    emit_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
