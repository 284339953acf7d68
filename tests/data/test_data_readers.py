"""Tests for data.readers: format detection, bad-sample handling, pipe refusal."""

from __future__ import annotations

import io
import tarfile

import datasets
import numpy as np
import pytest
from data_helpers import awkward_records, encode, good_records, noise_rgb, write_tar

from data.readers import open_samples, open_source
from data.shapes import generate_shapes
from data.skips import SkipCounter
from data.writers import write_hf, write_webdataset


def _mixed_shard(path):
    """~10% awkward records spread among 90 good ones."""
    bad, skipped, expected = awkward_records()
    good = good_records(90)
    records = list(good)
    for i, record in enumerate(bad):
        records.insert(3 + i * 9, record)
    write_tar(path, records)
    return len(records), skipped, expected


def test_shard_with_bad_samples_reads_to_completion(tmp_path):
    total, skipped, expected = _mixed_shard(tmp_path / "mixed.tar")
    counter = SkipCounter()
    samples = {s.key: s for s in open_samples(tmp_path / "mixed.tar", skip_counter=counter)}
    assert len(samples) == total - len(skipped)
    assert counter.total == len(skipped) == 5
    assert dict(counter.skipped) == {reason: 1 for reason in skipped.values()}
    assert sorted(k for keys in counter.skipped_keys.values() for k in keys) == sorted(skipped)
    assert counter.repaired == {"caption_utf8": 1}
    assert samples["ok-latin1"].caption == "caf\ufffd cr\ufffdme"
    for key, pixels in expected.items():
        assert samples[key].image.mode == "RGB"
        if key == "ok-cmyk":  # JPEG is lossy
            assert np.abs(np.asarray(samples[key].image, np.int16) - pixels).max() <= 3
        else:
            assert np.array_equal(np.asarray(samples[key].image), pixels), key
    assert samples["good-0007"].caption == "caption 7" and samples["good-0007"].meta == {"i": 7}


def test_truncated_tar_is_counted_and_the_next_shard_still_read(tmp_path):
    write_tar(tmp_path / "a.tar", good_records(10, "a"))
    with tarfile.open(tmp_path / "a.tar") as tar:
        cut = tar.getmember("a-0005.png").offset_data + 100  # in the middle of a member
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[:cut])
    write_tar(tmp_path / "b.tar", good_records(4, "b"))
    counter = SkipCounter()
    keys = [s.key for s in open_samples(tmp_path, skip_counter=counter)]
    assert counter.skipped["bad_shard"] == 1
    assert keys[-4:] == ["b-0000", "b-0001", "b-0002", "b-0003"]
    assert keys[:-4] == [f"a-{i:04d}" for i in range(5)]  # the interrupted record is dropped


def test_shard_patterns_and_lists(tmp_path):
    write_webdataset(generate_shapes(12, 32), tmp_path, shard_size=4)
    every = [s.key for s in open_samples(tmp_path)]
    assert len(every) == 12
    assert [s.key for s in open_samples(str(tmp_path / "shard-{000000..000002}.tar"))] == every
    assert [s.key for s in open_samples(str(tmp_path / "shard-*.tar"))] == every
    assert [s.key for s in open_samples([str(tmp_path / "shard-000002.tar")])] == every[8:]
    assert [s.key for s in open_samples(tmp_path / "shard-000001.tar")] == every[4:8]


def test_pipe_urls_are_refused_unless_allowed(tmp_path):
    write_webdataset(generate_shapes(3, 32), tmp_path)
    url = f"pipe:cat {tmp_path / 'shard-000000.tar'}"
    for path in (url, [url], [str(tmp_path / "shard-000000.tar"), url], "pipe:cat x-{0..3}.tar"):
        with pytest.raises(ValueError, match="allow_pipe"):
            open_samples(path)
    assert len(list(open_samples(url, allow_pipe=True))) == 3


def test_missing_paths_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_samples(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError):
        open_samples(str(tmp_path / "none-*.tar"))
    with pytest.raises(FileNotFoundError):
        open_samples(tmp_path / "x.tar")


def test_detects_formats(tmp_path):
    write_webdataset(generate_shapes(2, 32), tmp_path / "wds")
    write_hf(generate_shapes(2, 32), tmp_path / "hf")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.png").write_bytes(encode(noise_rgb(0, 4)))
    names = [type(open_source(tmp_path / d)).__name__ for d in ("wds", "hf", "folder")]
    assert names == ["TarSource", "HFSource", "FolderSource"]


def test_hf_dataset_objects_with_bad_cells():
    rows = {
        "image": [
            {"bytes": encode(noise_rgb(0, 4)), "path": None},
            {"bytes": b"not an image", "path": None},
            {"bytes": encode(noise_rgb(1, 4).convert("RGBA")), "path": None},
        ],
        "caption": [b"ok", b"\xff\xfe bad utf8", b"rgba"],
    }
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("binary")})
    ds = datasets.Dataset.from_dict(rows, features=features)
    counter = SkipCounter()
    samples = list(open_samples(ds, text_column="caption", skip_counter=counter))
    assert [s.key for s in samples] == ["000000000", "000000002"]
    assert counter.skipped == {"corrupt": 1}
    assert samples[0].caption == "ok" and samples[1].image.mode == "RGB"
    assert np.array_equal(np.asarray(samples[0].image), np.asarray(noise_rgb(0, 4)))
    with pytest.raises(ValueError, match="not in dataset columns"):
        open_samples(ds, text_column="text")
    both = datasets.DatasetDict({"train": ds, "test": ds})
    assert len(list(open_samples(both, text_column="caption"))) == 2


def test_hf_non_utf8_caption_is_repaired():
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": encode(noise_rgb(0, 4)), "path": None}], "text": [b"caf\xe9"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("binary")}),
    )
    counter = SkipCounter()
    (sample,) = open_samples(ds, skip_counter=counter)
    assert sample.caption == "caf\ufffd" and counter.repaired == {"caption_utf8": 1}


def test_record_without_caption_or_with_bad_meta(tmp_path):
    png = encode(noise_rgb(0, 4))
    write_tar(tmp_path / "x.tar", [("a", {"png": png}), ("b", {"png": png, "txt": b"hi", "json": b"{oops"})])
    counter = SkipCounter()
    samples = list(open_samples(tmp_path / "x.tar", skip_counter=counter))
    assert [(s.key, s.caption, s.meta) for s in samples] == [("a", "", {}), ("b", "hi", {})]
    assert counter.repaired == {"missing_caption": 1, "bad_meta": 1}
    assert counter.total == 0


def test_tar_members_in_folders_keep_their_path(tmp_path):
    buffer = io.BytesIO(encode(noise_rgb(0, 4)))
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        info = tarfile.TarInfo("dir/sub/item.png")
        info.size = len(buffer.getvalue())
        tar.addfile(info, buffer)
    assert [s.key for s in open_samples(tmp_path / "x.tar")] == ["dir/sub/item"]
