"""PyTorch access for training: a sharded `IterableDataset` and an in-memory tensor loader.

How an epoch is split over processes and DataLoader workers. There are
`parts = world_size * num_workers` readers; reader `part = rank * num_workers + worker_id` takes:

* tar shards, when there are at least `parts` shards: whole shards, `shards[part::parts]` of the
  epoch's shard order ("shard" mode; each reader reads only its own shards);
* tar shards, when there are fewer shards than readers: every reader streams all shards in the
  same order and keeps the records whose running index i satisfies `i % parts == part`
  ("sample" mode; records are counted before decoding, so a bad sample cannot shift the split);
* HF datasets and image folders (random access): `order[part::parts]` of the epoch's
  permutation of all indices ("index" mode).

So every sample of an epoch goes to exactly one (rank, worker). Readers may get slightly
different counts (no padding or dropping), so with DDP use a loader that tolerates uneven ends
or a fixed number of steps. The epoch's shard/index order depends only on (seed, epoch), which
all readers share; each reader additionally shuffles its own stream (tar sources) with a buffer.
Call `set_epoch(epoch)` before each epoch; with `persistent_workers=True` the workers keep the
epoch they were started with, so use non-persistent workers when shuffling per epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data.images import pil_to_tensor, resize_center_crop, resolve_resample
from data.readers import TarSource, iter_source, open_source
from data.sample import Sample
from data.skips import SkipCounter

LOGGER = logging.getLogger("data")


def split_mode(source: Any, parts: int) -> str:
    """ "shard", "sample" or "index": how `parts` readers divide `source` (module docstring)."""
    if isinstance(source, TarSource):
        return "shard" if len(source.urls) >= parts else "sample"
    return "index"


def _buffer_shuffle(items: Iterator[Sample], size: int, rng: np.random.Generator) -> Iterator[Sample]:
    buffer: list[Sample] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


class ImageTextDataset(IterableDataset):
    """Yields {"pixels": float (3, R, R) in [-1, 1], "caption": str, "key": str} for training.

    `path` is anything `data.readers.open_source` accepts. `rank`/`world_size` come from the
    launcher (e.g. `accelerator.process_index`, `accelerator.num_processes`); DataLoader
    workers are detected with `get_worker_info`. `resample` is "nearest" for the shapes and
    digits data (keeps sharp edges; a no-op at native resolution) and "bicubic" for photos.
    """

    def __init__(
        self,
        path: Any,
        resolution: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        resample: str = "nearest",
        image_column: str = "image",
        text_column: str = "text",
        allow_pipe: bool = False,
        shuffle_buffer: int = 1000,
    ):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        resolve_resample(resample)  # fail now on an unknown filter name, not in a worker
        listing = SkipCounter()
        self.source = open_source(
            path,
            image_column=image_column,
            text_column=text_column,
            allow_pipe=allow_pipe,
            skip_counter=listing,
        )
        listing.log_summary(LOGGER)
        self.resolution = resolution
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.resample = resample
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffling order the next iteration uses."""
        self.epoch = epoch

    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        num_workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.world_size * num_workers, self.rank * num_workers + worker_id

    def _samples(self, parts: int, part: int, counter: SkipCounter) -> Iterator[Sample]:
        epoch_rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
        local_rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, part + 1]))
        source = self.source
        mode = split_mode(source, parts)
        if isinstance(source, TarSource):
            urls = list(source.urls)
            if self.shuffle:
                urls = [urls[i] for i in epoch_rng.permutation(len(urls))]
            if mode == "shard":
                records = source.records(urls[part::parts], counter)
            else:
                records = (r for i, r in enumerate(source.records(urls, counter)) if i % parts == part)
            samples = (s for s in (source.to_sample(r, counter) for r in records) if s is not None)
            return _buffer_shuffle(samples, self.shuffle_buffer, local_rng) if self.shuffle else samples
        order = epoch_rng.permutation(len(source)) if self.shuffle else np.arange(len(source))
        picked = (source.get(int(i), counter) for i in order[part::parts])
        return (s for s in picked if s is not None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        parts, part = self._reader()
        counter = SkipCounter()
        for sample in self._samples(parts, part, counter):
            image = resize_center_crop(sample.image, self.resolution, self.resample)
            yield {"pixels": pil_to_tensor(image), "caption": sample.caption, "key": sample.key}
        counter.log_summary(LOGGER, self.epoch)


def load_images_tensor(
    path: Any,
    resolution: int,
    max_samples: int | None = None,
    resample: str = "nearest",
    *,
    image_column: str = "image",
    text_column: str = "text",
) -> tuple[torch.Tensor, list[str], SkipCounter]:
    """Load a small dataset fully into memory: uint8 (N, 3, R, R), captions, skip counts.

    The fast path for the 32x32 embedded data (a few MB), e.g. for tokenizer training.
    """
    counter = SkipCounter()
    source = open_source(path, image_column=image_column, text_column=text_column, skip_counter=counter)
    arrays: list[np.ndarray] = []
    captions: list[str] = []
    for sample in iter_source(source, counter):
        if max_samples is not None and len(arrays) >= max_samples:
            break
        arrays.append(np.asarray(resize_center_crop(sample.image, resolution, resample), dtype=np.uint8))
        captions.append(sample.caption)
    if arrays:
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    else:
        pixels = torch.zeros((0, 3, resolution, resolution), dtype=torch.uint8)
    counter.log_summary(LOGGER)
    return pixels, captions, counter
