"""Tests for data.folder: sidecar captions, metadata.jsonl, bad files and keys."""

from __future__ import annotations

import json

import numpy as np
from data_helpers import encode, noise_rgb
from PIL import Image

from data.folder import iter_folder, list_folder
from data.skips import SkipCounter


def _make_folder(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(encode(noise_rgb(1, 8)))
    (root / "a.txt").write_text("  caption of a\n", encoding="utf-8")
    (root / "b.jpg").write_bytes(encode(noise_rgb(2, 8), "JPEG"))
    (root / "b.txt").write_bytes("na\u00efve caption".encode("latin-1"))
    (root / "sub" / "c.v2.png").write_bytes(encode(Image.new("L", (8, 8), 77)))
    (root / "sub" / "c.v2.txt").write_text("caption of c", encoding="utf-8")
    (root / "d.png").write_bytes(b"")
    (root / "d.txt").write_text("zero bytes", encoding="utf-8")
    (root / "e.png").write_bytes(encode(noise_rgb(5, 8)))  # no caption at all
    (root / ".hidden.png").write_bytes(encode(noise_rgb(6, 8)))
    (root / "notes.md").write_text("not an image", encoding="utf-8")


def test_sidecar_captions(tmp_path):
    _make_folder(tmp_path)
    counter = SkipCounter()
    samples = {s.key: s for s in iter_folder(tmp_path, skip_counter=counter)}
    assert sorted(samples) == ["a", "b", "e", "sub/c_v2"]
    assert samples["a"].caption == "caption of a"
    assert np.array_equal(np.asarray(samples["a"].image), np.asarray(noise_rgb(1, 8)))
    assert samples["b"].caption == "na\ufffdve caption"
    assert samples["sub/c_v2"].caption == "caption of c"
    assert np.all(np.asarray(samples["sub/c_v2"].image) == 77)
    assert samples["e"].caption == ""
    assert counter.skipped == {"empty": 1}
    assert counter.repaired == {"caption_utf8": 1, "missing_caption": 1}


def test_metadata_jsonl_wins_over_sidecars(tmp_path):
    _make_folder(tmp_path)
    lines = [
        json.dumps({"file_name": "a.png", "text": "from metadata", "source": "camera"}),
        "{broken json",
        json.dumps({"file_name": "sub/c.v2.png", "caption": "via caption field"}),
        "",
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines), encoding="utf-8")
    counter = SkipCounter()
    samples = {s.key: s for s in iter_folder(tmp_path, skip_counter=counter)}
    assert samples["a"].caption == "from metadata"
    assert samples["a"].meta == {"source": "camera"}
    assert samples["sub/c_v2"].caption == "via caption field"
    assert samples["b"].caption == "na\ufffdve caption"  # not in metadata: sidecar
    assert counter.repaired["bad_metadata_line"] == 1


def test_metadata_in_a_subfolder_is_relative_to_it(tmp_path):
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "x.png").write_bytes(encode(noise_rgb(0, 4)))
    (tmp_path / "part" / "metadata.jsonl").write_bytes(
        json.dumps({"file_name": "x.png", "text": "X"}).encode() + b"\n"
    )
    items = list_folder(tmp_path)
    assert [(i.key, i.caption) for i in items] == [("part/x", "X")]


def test_same_stem_different_extension_get_unique_keys(tmp_path):
    (tmp_path / "x.png").write_bytes(encode(noise_rgb(0, 4)))
    (tmp_path / "x.jpg").write_bytes(encode(noise_rgb(0, 4), "JPEG"))
    keys = [i.key for i in list_folder(tmp_path)]
    assert len(set(keys)) == 2
