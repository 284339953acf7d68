"""Tests for data.codes (codes directories) and tokenizers_mm.identity (the tokenizer fingerprint)."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from data_helpers import write_tar

import data.codes as codes_module
from data.codes import META_FILE, CodesMismatchError, load_codes, read_codes_meta, write_codes
from tokenizers_mm import ImageTokenizer, tokenizer_identity
from tokenizers_mm.presets import preset_config

TINY = dict(resolution=32, base_channels=8, channel_mult=[1, 2, 2], mid_blocks=0, norm_groups=4)
CAPTIONS = ["a red circle", "café crème", "東京の夜 🌃", "naïve — “quoted”"]


def _tiny(preset: str = "fsq-8x8", seed: int = 0) -> ImageTokenizer:
    torch.manual_seed(seed)
    return ImageTokenizer(preset_config(preset, **TINY)).eval()


@pytest.fixture(scope="module")
def model() -> ImageTokenizer:
    return _tiny()


def _codes(n: int = 20, high: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, high, (n, 8, 8), generator=torch.Generator().manual_seed(seed))


def _samples(n: int = 20) -> tuple[list[str], list[str]]:
    return [f"img-{i:04d}" for i in range(n)], [f"{CAPTIONS[i % len(CAPTIONS)]} {i}" for i in range(n)]


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _read_tar(path) -> list[tuple[str, dict[str, bytes]]]:
    records: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            records.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(records.items())


class _CreatesFile:
    """Unpickling this calls open(path, "w"): a stand-in for a malicious payload."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------- identity


def test_identity_fields(model):
    identity = tokenizer_identity(model)
    assert len(identity["fingerprint"]) == 64 and int(identity["fingerprint"], 16) >= 0
    assert identity["bottleneck"] == "fsq" and identity["codebook_size"] == 1000
    assert identity["latent_channels"] is None
    assert (identity["resolution"], identity["grid"]) == (32, [8, 8])
    assert identity["format_version"] == 1 and identity["package_version"]
    assert tokenizer_identity(model, 64)["grid"] == [16, 16]
    json.dumps(identity)  # stored as JSON
    continuous = tokenizer_identity(_tiny("kl-8x8"))
    assert continuous["codebook_size"] is None and continuous["latent_channels"] == 4


def test_fingerprint_stable_across_save_load(model, tmp_path):
    model.save_pretrained(tmp_path / "tok")
    loaded = ImageTokenizer.from_pretrained(tmp_path / "tok")
    before, after = tokenizer_identity(model), tokenizer_identity(loaded)
    assert after["fingerprint"] == before["fingerprint"]
    assert after["name_or_path"] == str(tmp_path / "tok") != before["name_or_path"]
    assert tokenizer_identity(_tiny(seed=0))["fingerprint"] == before["fingerprint"]  # same init, same print


def test_fingerprint_changes_with_one_weight_or_config_field(model):
    base = tokenizer_identity(model)["fingerprint"]
    other = _tiny()
    with torch.no_grad():
        other.decoder.net[0].weight[0, 0, 0, 0] += 1e-6
    assert tokenizer_identity(other)["fingerprint"] != base
    other = _tiny()
    other.config.latent_mean = [0.0] * 4  # config fields count too
    assert tokenizer_identity(other)["fingerprint"] != base
    assert tokenizer_identity(_tiny(seed=1))["fingerprint"] != base


# ---------------------------------------------------------------- write / load


def test_round_trip_discrete(model, tmp_path):
    keys, captions = _samples(20)
    tokens = _codes(20)
    out = write_codes(tmp_path / "codes", keys, captions, tokens, tokenizer_identity(model), shard_size=8)
    assert sorted(p.name for p in out.iterdir()) == [
        "codes-000000.tar",
        "codes-000001.tar",
        "codes-000002.tar",
        META_FILE,
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    data = load_codes(out, expect=model)
    assert data.tokens.dtype == torch.long and torch.equal(data.tokens, tokens)
    assert data.keys == keys and data.captions == captions and len(data) == 20
    assert data.skips.total == 0
    meta = read_codes_meta(out)
    assert (meta["count"], meta["kind"], meta["dtype"], meta["grid"]) == (20, "codes", "int16", [8, 8])
    assert data.identity == tokenizer_identity(model)
    stored = _read_tar(out / "codes-000000.tar")[0][1]
    assert np.load(io.BytesIO(stored["codes.npy"]), allow_pickle=False).dtype == np.int16
    # plain ustar members: a float mtime would add a PAX header to every file (twice the reading work)
    with tarfile.open(out / "codes-000000.tar") as tar:
        assert all(m.pax_headers == {} and m.mtime == 0 for m in tar.getmembers())


def test_npy_variants_that_numpy_reads_load_the_same(model, tmp_path):
    """Headers are parsed once per distinct header (cached by their bytes), the data viewed in place:
    Fortran order, a version 2.0 header and a sample whose header differs all load as numpy reads them,
    and trailing bytes after the data are refused."""
    keys, captions = _samples(6)
    tokens = _codes(6)
    out = write_codes(tmp_path / "codes", keys, captions, tokens, tokenizer_identity(model))
    good = np.arange(64, dtype=np.int16).reshape(8, 8) % 1000
    fortran = io.BytesIO()
    np.lib.format.write_array(fortran, np.asfortranarray(good), version=(1, 0))
    assert np.load(io.BytesIO(fortran.getvalue())).flags.f_contiguous
    v2 = io.BytesIO()
    np.lib.format.write_array(v2, good + 1, version=(2, 0))
    planted = [
        ("var-fortran", {"codes.npy": fortran.getvalue(), "txt": b"f"}),
        ("var-v2", {"codes.npy": v2.getvalue(), "txt": b"v"}),
        ("bad-trailing", {"codes.npy": _npy(good) + b"\0" * 2, "txt": b"t"}),
    ]
    shard = out / "codes-000000.tar"
    original = _read_tar(shard)
    write_tar(shard, original[:2] + planted + original[2:])
    data = load_codes(out, expect=model)
    assert data.keys == [*keys[:2], "var-fortran", "var-v2", *keys[2:]]
    assert torch.equal(data.tokens[2], torch.from_numpy(good).long())
    assert torch.equal(data.tokens[3], torch.from_numpy(good + 1).long())
    assert torch.equal(data.tokens[[0, 1, 4, 5, 6, 7]], tokens)
    assert data.skips.skipped_keys == {"bad_npy": ["bad-trailing"]}


def test_large_codebook_stored_as_int32(model, tmp_path):
    identity = {**tokenizer_identity(model), "codebook_size": 40_000}
    keys, captions = _samples(3)
    tokens = _codes(3, high=40_000)
    tokens[0, 0, 0] = 39_999
    write_codes(tmp_path / "codes", keys, captions, tokens, identity, extra_meta={"note": "x"})
    data = load_codes(tmp_path / "codes", expect=identity)
    assert data.meta["dtype"] == "int32" and data.meta["extra_meta"] == {"note": "x"}
    assert torch.equal(data.tokens, tokens)


def test_round_trip_continuous_float32(tmp_path):
    kl = _tiny("kl-8x8")
    pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = kl.encode(pixels)  # (5, 8, 8, 4)
    keys, captions = _samples(5)
    write_codes(tmp_path / "codes", keys, captions, latents, tokenizer_identity(kl))
    data = load_codes(tmp_path / "codes", expect=kl)
    assert data.meta["kind"] == "latents" and data.tokens.dtype == torch.float32
    assert torch.equal(data.tokens, latents)
    assert (tmp_path / "codes" / "codes-000000.tar").is_file()
    assert "img-0000.latents.npy" in tarfile.open(tmp_path / "codes" / "codes-000000.tar").getnames()


def test_mismatched_tokenizer_is_an_error(model, tmp_path):
    keys, captions = _samples(4)
    write_codes(tmp_path / "codes", keys, captions, _codes(4), tokenizer_identity(model))
    other = _tiny(seed=1)  # same architecture, different weights
    with pytest.raises(CodesMismatchError) as err:
        load_codes(tmp_path / "codes", expect=other)
    message = str(err.value)
    assert tokenizer_identity(model)["fingerprint"] in message
    assert tokenizer_identity(other)["fingerprint"] in message
    assert "python -m data.extract_codes" in message
    assert isinstance(err.value, ValueError)
    with pytest.raises(CodesMismatchError, match="grid"):
        load_codes(tmp_path / "codes", expect=tokenizer_identity(model, resolution=64))
    assert len(load_codes(tmp_path / "codes", expect=tokenizer_identity(model))) == 4
    assert len(load_codes(tmp_path / "codes")) == 4  # no expectation: no check


def test_missing_or_invalid_meta(model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="codes_meta.json is missing"):
        load_codes(tmp_path / "empty")
    out = write_codes(tmp_path / "codes", *_samples(2), _codes(2), tokenizer_identity(model))
    meta = json.loads((out / META_FILE).read_text())
    (out / META_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_codes(out)
    (out / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "identity"}))
    with pytest.raises(ValueError, match="identity"):
        load_codes(out)
    (out / META_FILE).write_text(json.dumps({**meta, "dtype": "object"}))
    with pytest.raises(ValueError, match="dtype"):
        load_codes(out)
    (out / META_FILE).write_text(json.dumps({**meta, "shards": ["../elsewhere.tar"]}))
    with pytest.raises(ValueError, match="shards"):
        load_codes(out)


def test_corrupt_samples_are_skipped_counted_and_never_unpickled(model, tmp_path):
    keys, captions = _samples(6)
    tokens = _codes(6)
    out = write_codes(tmp_path / "codes", keys, captions, tokens, tokenizer_identity(model))
    marker, control = tmp_path / "pwned", tmp_path / "control"
    # The payload works: unpickling it does create a file.
    np.load(io.BytesIO(_npy(np.array([_CreatesFile(str(control))], dtype=object), True)), allow_pickle=True)
    assert control.exists()
    good = np.zeros((8, 8), np.int16)
    txt = b"caption"
    planted = [
        ("evil-object", {"codes.npy": _npy(np.array([_CreatesFile(str(marker))], dtype=object), True)}),
        ("evil-pickle", {"codes.npy": pickle.dumps(_CreatesFile(str(marker))), "txt": txt}),
        ("bad-truncated", {"codes.npy": _npy(good)[:-10], "txt": txt}),
        ("bad-shape", {"codes.npy": _npy(np.zeros((4, 4), np.int16)), "txt": txt}),
        ("bad-dtype", {"codes.npy": _npy(good.astype(np.float64)), "txt": txt}),
        ("bad-code", {"codes.npy": _npy(good + 1000), "txt": txt}),
        ("bad-caption", {"codes.npy": _npy(good), "txt": "caf\u00e9".encode("latin-1")}),
        ("bad-nocaption", {"codes.npy": _npy(good)}),
        ("bad-nocodes", {"txt": txt}),
    ]
    planted[0][1]["txt"] = txt
    shard = out / "codes-000000.tar"
    original = _read_tar(shard)
    write_tar(shard, original[:3] + planted + original[3:])

    data = load_codes(out, expect=model)
    assert not marker.exists()
    assert data.keys == keys and data.captions == captions and torch.equal(data.tokens, tokens)
    expected = {
        "object_dtype": ["evil-object"],
        "bad_npy": ["evil-pickle", "bad-truncated"],
        "bad_shape": ["bad-shape"],
        "bad_dtype": ["bad-dtype"],
        "bad_code": ["bad-code"],
        "caption_utf8": ["bad-caption"],
        "missing_caption": ["bad-nocaption"],
        "missing_codes": ["bad-nocodes"],
    }
    assert data.skips.skipped_keys == expected
    assert data.skips.total == 9


def test_all_samples_bad_gives_empty_tensor(model, tmp_path):
    out = write_codes(tmp_path / "codes", *_samples(2), _codes(2), tokenizer_identity(model))
    write_tar(out / "codes-000000.tar", [("x", {"codes.npy": b"garbage", "txt": b"c"})])
    data = load_codes(out)
    assert data.tokens.shape == (0, 8, 8) and data.tokens.dtype == torch.long
    assert data.skips.skipped == {"bad_npy": 1}


def test_write_validates_inputs(model, tmp_path):
    identity = tokenizer_identity(model)
    keys, captions = _samples(3)
    out = tmp_path / "codes"
    for bad in (1000, -1):
        tokens = _codes(3)
        tokens[1, 2, 3] = bad
        with pytest.raises(ValueError, match=r"\[0, 1000\)"):
            write_codes(out, keys, captions, tokens, identity)
    with pytest.raises(ValueError, match="integer"):
        write_codes(out, keys, captions, _codes(3).float(), identity)
    with pytest.raises(ValueError, match="grid"):
        write_codes(out, keys, captions, torch.zeros(3, 4, 4, dtype=torch.long), identity)
    with pytest.raises(ValueError, match="one key and caption per sample"):
        write_codes(out, keys[:2], captions, _codes(3), identity)
    with pytest.raises(ValueError, match="duplicate"):
        write_codes(out, ["a.b", "a_b", "c"], captions, _codes(3), identity)
    with pytest.raises(ValueError, match="shard_size"):
        write_codes(out, keys, captions, _codes(3), identity, shard_size=0)
    kl_identity = tokenizer_identity(_tiny("kl-8x8"))
    with pytest.raises(ValueError, match="float tensor"):
        write_codes(out, keys, captions, torch.zeros(3, 8, 8, 3), kl_identity)
    with pytest.raises(ValueError, match="float tensor"):
        write_codes(out, keys, captions, torch.zeros(3, 8, 8, 4, dtype=torch.long), kl_identity)
    with pytest.raises(ValueError, match="NaN"):
        write_codes(out, keys, captions, torch.full((3, 8, 8, 4), float("nan")), kl_identity)
    with pytest.raises(ValueError, match="identity lacks"):
        write_codes(out, keys, captions, _codes(3), {"grid": [8, 8]})
    assert not out.exists()


def test_out_dir_refused_unless_overwrite_and_writes_are_atomic(model, tmp_path, monkeypatch):
    identity = tokenizer_identity(model)
    keys, captions = _samples(3)
    out = write_codes(tmp_path / "codes", keys, captions, _codes(3), identity)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_codes(out, keys, captions, _codes(3, seed=1), identity)
    write_codes(out, keys, captions, _codes(3, seed=1), identity, overwrite=True)
    assert torch.equal(load_codes(out).tokens, _codes(3, seed=1))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="does not look like a codes directory"):
        write_codes(tmp_path / "other", keys, captions, _codes(3), identity, overwrite=True)

    def crash(array):
        raise RuntimeError("disk full")

    monkeypatch.setattr(codes_module, "_npy_bytes", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_codes(out, keys, captions, _codes(3, seed=2), identity, overwrite=True)
    monkeypatch.undo()
    assert torch.equal(load_codes(out).tokens, _codes(3, seed=1))  # the old codes survive a crash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes", "other"]


def test_a_config_key_added_later_keeps_old_fingerprints_at_its_neutral_value(model):
    """Folders and codes saved before ``fsq_entropy_mode`` existed must still match their tokenizer:
    at its neutral value ("channel", the old behaviour) the key is left out of the hash; any other
    value changes the fingerprint."""
    from tokenizers_mm.identity import ADDED_CONFIG_KEYS, VOLATILE_CONFIG_KEYS, _tensor_bytes

    base = tokenizer_identity(model)["fingerprint"]
    # The format-1 recipe over a config dict without the added keys (what older versions hashed).
    old_config = {
        k: v
        for k, v in model.config.to_dict().items()
        if k not in VOLATILE_CONFIG_KEYS and k not in ADDED_CONFIG_KEYS
    }
    digest = hashlib.sha256(json.dumps(old_config, sort_keys=True, separators=(",", ":")).encode())
    state = model.state_dict()
    for name in sorted(state):
        data = _tensor_bytes(state[name])
        header = [name, str(state[name].dtype), list(state[name].shape), len(data)]
        digest.update(json.dumps(header, separators=(",", ":")).encode())
        digest.update(data)
    assert digest.hexdigest() == base
    other = _tiny()
    other.config.fsq_entropy_mode = "joint"
    assert tokenizer_identity(other)["fingerprint"] != base
