"""Tests for data.writers: webdataset and HF round trips, atomic writes, dataset_info.json."""

from __future__ import annotations

import json
import tarfile

import datasets
import numpy as np
import pytest

from data.readers import open_samples
from data.sample import Sample
from data.shapes import generate_shapes
from data.writers import read_dataset_info, write_hf, write_webdataset


def _same(a: Sample, b: Sample) -> bool:
    return (
        a.key == b.key
        and a.caption == b.caption
        and a.meta == b.meta
        and b.image.mode == "RGB"
        and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    )


def test_webdataset_round_trip(tmp_path):
    samples = list(generate_shapes(23, 32, seed=2))
    shards = write_webdataset(samples, tmp_path / "wds", shard_size=10, info={"source": "shapes", "seed": 2})
    assert [p.split("/")[-1] for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    assert names[:3] == ["shapes-000000000.json", "shapes-000000000.png", "shapes-000000000.txt"]
    assert len(names) == 30
    with tarfile.open(shards[0]) as tar:  # plain ustar members, no PAX header per file (integer mtime)
        assert all(m.pax_headers == {} and m.mtime == 0 for m in tar.getmembers())
    back = list(open_samples(tmp_path / "wds"))
    assert len(back) == 23 and all(_same(a, b) for a, b in zip(samples, back))
    info = read_dataset_info(tmp_path / "wds")
    assert info["num"] == 23 and info["format"] == "webdataset" and info["resolution"] == 32
    assert info["source"] == "shapes" and info["seed"] == 2
    assert info["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert "mmgen-toolkit" in info["created_by"]
    assert not list((tmp_path / "wds").glob("*.tmp"))


def test_webdataset_is_byte_reproducible(tmp_path):
    first = write_webdataset(generate_shapes(5, 32, seed=1), tmp_path / "a")
    second = write_webdataset(generate_shapes(5, 32, seed=1), tmp_path / "b")
    assert open(first[0], "rb").read() == open(second[0], "rb").read()


def _failing(n_ok: int):
    yield from generate_shapes(n_ok, 32)
    raise RuntimeError("killed")


def test_webdataset_interrupted_build_leaves_no_partial_shard(tmp_path):
    out = tmp_path / "wds"
    with pytest.raises(RuntimeError, match="killed"):
        write_webdataset(_failing(7), out, shard_size=5)
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]  # only the complete shard
    assert len(list(open_samples(out / "shard-000000.tar"))) == 5


def test_writers_refuse_non_empty_output_and_duplicate_keys(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        write_webdataset(generate_shapes(2, 32), tmp_path / "full")
    with pytest.raises(FileExistsError):
        write_hf(generate_shapes(2, 32), tmp_path / "full")
    sample = next(generate_shapes(1, 32))
    with pytest.raises(ValueError, match="duplicate"):
        write_webdataset([sample, sample], tmp_path / "dup")


def test_hf_round_trip(tmp_path):
    samples = list(generate_shapes(12, 32, seed=4))
    out = write_hf(samples, tmp_path / "hf", info={"source": "shapes", "seed": 4})
    ds = datasets.load_from_disk(out)
    assert ds.column_names == ["key", "image", "text", "meta"]
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds[3]["text"] == samples[3].caption and json.loads(ds[3]["meta"]) == samples[3].meta
    back = list(open_samples(tmp_path / "hf"))
    assert len(back) == 12 and all(_same(a, b) for a, b in zip(samples, back))
    info = read_dataset_info(tmp_path / "hf")
    assert (info["num"], info["format"], info["resolution"], info["source"]) == (12, "hf", 32, "shapes")
    assert info["features"]  # save_to_disk's own fields are kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary directory left


def test_hf_interrupted_build_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        write_hf(_failing(3), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
