"""Tests for data.torch_dataset: exact rank x worker splitting, epochs, tensors."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from data_helpers import awkward_records, encode, good_records, noise_rgb, write_tar
from torch.utils.data import DataLoader

import data.torch_dataset as torch_dataset
from data.readers import open_source
from data.shapes import generate_shapes
from data.torch_dataset import ImageTextDataset, load_images_tensor, split_mode
from data.writers import write_hf, write_webdataset

RANKS, WORKERS = 2, 2


def _keys_per_reader(path, monkeypatch, epoch=0, **kwargs):
    """Keys each (rank, worker) yields, simulating DataLoader workers via get_worker_info."""
    seen = {}
    for rank in range(RANKS):
        dataset = ImageTextDataset(path, 8, rank=rank, world_size=RANKS, seed=3, **kwargs)
        dataset.set_epoch(epoch)
        for worker in range(WORKERS):
            info = SimpleNamespace(num_workers=WORKERS, id=worker)
            monkeypatch.setattr(torch_dataset, "get_worker_info", lambda info=info: info)
            seen[(rank, worker)] = [item["key"] for item in dataset]
    return seen


def _assert_exact_partition(seen, expected_keys):
    every = [key for keys in seen.values() for key in keys]
    duplicates = [k for k, n in Counter(every).items() if n > 1]
    assert not duplicates
    assert sorted(every) == sorted(expected_keys)
    assert all(keys for keys in seen.values())  # nobody idles on these sizes


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("many") / "wds"
    write_webdataset(generate_shapes(40, 8), out, shard_size=5)  # 8 shards >= 4 readers
    return out


@pytest.fixture(scope="module")
def few_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("few") / "wds"
    write_webdataset(generate_shapes(30, 8), out, shard_size=15)  # 2 shards < 4 readers
    return out


def test_many_shards_split_by_shard(many_shards, monkeypatch):
    assert split_mode(open_source(many_shards), RANKS * WORKERS) == "shard"
    seen = _keys_per_reader(many_shards, monkeypatch)
    _assert_exact_partition(seen, [f"shapes-{i:09d}" for i in range(40)])
    for keys in seen.values():  # every reader gets two whole shards of 5
        shards = Counter(int(key.split("-")[1]) // 5 for key in keys)
        assert len(shards) == 2 and set(shards.values()) == {5}


def test_few_shards_split_by_sample(few_shards, monkeypatch):
    assert split_mode(open_source(few_shards), RANKS * WORKERS) == "sample"
    for shuffle in (True, False):
        seen = _keys_per_reader(few_shards, monkeypatch, shuffle=shuffle)
        _assert_exact_partition(seen, [f"shapes-{i:09d}" for i in range(30)])
        assert sorted(len(keys) for keys in seen.values()) == [7, 7, 8, 8]  # records 0..29 modulo 4


def test_split_is_exact_with_bad_samples(tmp_path, monkeypatch):
    bad, skipped, _ = awkward_records()
    write_tar(tmp_path / "shard-0.tar", good_records(20, "x") + bad)
    expected = [f"x-{i:04d}" for i in range(20)] + [k for k, _ in bad if k not in skipped]
    _assert_exact_partition(_keys_per_reader(tmp_path, monkeypatch), expected)


def test_hf_and_folder_split_by_index(tmp_path, monkeypatch):
    write_hf(generate_shapes(21, 8), tmp_path / "hf")
    assert split_mode(open_source(tmp_path / "hf"), 4) == "index"
    _assert_exact_partition(
        _keys_per_reader(tmp_path / "hf", monkeypatch), [f"shapes-{i:09d}" for i in range(21)]
    )
    (tmp_path / "folder").mkdir()
    for i in range(9):
        (tmp_path / "folder" / f"im{i}.png").write_bytes(encode(noise_rgb(i, 6)))
    seen = _keys_per_reader(tmp_path / "folder", monkeypatch)
    _assert_exact_partition(seen, [f"im{i}" for i in range(9)])


def test_epochs_reshuffle_but_keep_the_partition(many_shards, few_shards, monkeypatch):
    for path in (many_shards, few_shards):
        epoch0 = _keys_per_reader(path, monkeypatch, epoch=0)
        again = _keys_per_reader(path, monkeypatch, epoch=0)
        epoch1 = _keys_per_reader(path, monkeypatch, epoch=1)
        assert epoch0 == again
        assert epoch0 != epoch1
        _assert_exact_partition(epoch1, [k for keys in epoch0.values() for k in keys])


def test_real_dataloader_workers(many_shards):
    keys = []
    for rank in range(RANKS):
        dataset = ImageTextDataset(many_shards, 8, rank=rank, world_size=RANKS)
        loader = DataLoader(dataset, batch_size=4, num_workers=2)
        for batch in loader:
            assert batch["pixels"].shape[1:] == (3, 8, 8)
            keys.extend(batch["key"])
    assert sorted(keys) == [f"shapes-{i:09d}" for i in range(40)]


def test_items_are_normalised_tensors(tmp_path):
    samples = list(generate_shapes(4, 32, seed=9))
    write_webdataset(samples, tmp_path / "wds")
    items = list(ImageTextDataset(tmp_path / "wds", 32, shuffle=False))
    assert [i["key"] for i in items] == [s.key for s in samples]
    pixels = items[0]["pixels"]
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 32, 32)
    assert pixels.min() == -1.0 and pixels.max() <= 1.0
    expected = torch.from_numpy(np.asarray(samples[0].image).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(pixels, expected)
    assert items[0]["caption"] == samples[0].caption
    assert list(ImageTextDataset(tmp_path / "wds", 16, resample="bicubic"))[0]["pixels"].shape == (3, 16, 16)


def test_invalid_arguments(tmp_path):
    write_webdataset(generate_shapes(2, 8), tmp_path)
    with pytest.raises(ValueError, match="rank"):
        ImageTextDataset(tmp_path, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="allow_pipe"):
        ImageTextDataset(f"pipe:cat {tmp_path}/shard-000000.tar", 8)


def test_load_images_tensor(tmp_path):
    samples = list(generate_shapes(10, 32, seed=1))
    write_hf(samples, tmp_path / "hf")
    pixels, captions, counter = load_images_tensor(tmp_path / "hf", 32)
    assert pixels.dtype == torch.uint8 and pixels.shape == (10, 3, 32, 32)
    assert np.array_equal(pixels[3].permute(1, 2, 0).numpy(), np.asarray(samples[3].image))
    assert captions == [s.caption for s in samples] and counter.total == 0
    small, _, _ = load_images_tensor(tmp_path / "hf", 16, max_samples=4)
    assert small.shape == (4, 3, 16, 16)
