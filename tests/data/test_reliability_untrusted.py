"""Dataset and codes files from a stranger are read as data, never unpickled.

(Pickled ``.npy`` members of a codes directory are covered in ``test_data_codes.py``.)
"""

from __future__ import annotations

import pickle

import datasets
import numpy as np
import torch
from data_helpers import encode, noise_rgb, write_tar
from fault_launch import PicklePayload

from data.codes import load_codes, write_codes
from data.readers import open_samples
from data.skips import SkipCounter
from data.torch_dataset import ImageTextDataset


def _payload(marker) -> bytes:
    return pickle.dumps(PicklePayload(marker))


def test_the_payload_is_live(tmp_path):
    pickle.loads(_payload(tmp_path / "pwned"))
    assert (tmp_path / "pwned").is_file()


def test_pickle_members_of_a_shard_are_never_unpickled(tmp_path):
    """webdataset's own decoders unpickle ``.pyd``/``.pickle`` members; our readers never do."""
    marker = tmp_path / "pwned"
    evil = _payload(marker)
    extras = {"pyd": evil, "pickle": evil, "pth": evil}
    records = [(f"s{i}", {"png": encode(noise_rgb(i, 8)), "txt": b"a caption", **extras}) for i in range(3)]
    records.append(("s3", {"png": evil, "txt": b"the image is a pickle"}))
    write_tar(tmp_path / "shard-000000.tar", records)
    counter = SkipCounter()
    samples = list(open_samples(tmp_path / "shard-000000.tar", skip_counter=counter))
    assert [s.key for s in samples] == ["s0", "s1", "s2"] and counter.skipped == {"corrupt": 1}
    assert all(s.meta == {} for s in samples)
    items = list(ImageTextDataset(tmp_path, 8))
    assert len(items) == 3
    assert not marker.exists()


def test_a_pickle_in_place_of_a_shard_or_an_image_cell_is_skipped(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "wds").mkdir()
    (tmp_path / "wds" / "shard-000000.tar").write_bytes(_payload(marker))
    counter = SkipCounter()
    assert list(open_samples(tmp_path / "wds", skip_counter=counter)) == []
    assert counter.skipped == {"bad_shard": 1}

    rows = {"image": [{"bytes": _payload(marker), "path": None}], "text": ["x"]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    counter = SkipCounter()
    assert list(open_samples(tmp_path / "hf", skip_counter=counter)) == []
    assert counter.skipped == {"corrupt": 1}
    assert not marker.exists()


def test_a_pickle_in_place_of_a_codes_shard_is_skipped(tmp_path):
    identity = {"fingerprint": "f" * 64, "grid": [2, 2], "codebook_size": 16, "name_or_path": "t"}
    tokens = torch.arange(12).reshape(3, 2, 2) % 16
    out = write_codes(tmp_path / "codes", ["a", "b", "c"], ["x", "y", "z"], tokens, identity, shard_size=2)
    marker = tmp_path / "pwned"
    (out / "codes-000001.tar").write_bytes(_payload(marker))
    data = load_codes(out, expect=identity)
    assert data.keys == ["a", "b"] and data.skips.skipped == {"bad_shard": 1}
    assert np.array_equal(data.tokens.numpy(), tokens[:2].numpy())
    assert not marker.exists()
