"""Tests for the data.extract_codes CLI and its extract_codes() function."""

from __future__ import annotations

import pytest
import torch
from data_helpers import noise_rgb

import data.extract_codes as extract_module
from data.codes import CodesMismatchError, load_codes
from data.extract_codes import extract_codes, main
from data.sources import samples_tensor
from tokenizers_mm import ImageTokenizer, tokenizer_identity
from tokenizers_mm.presets import preset_config

TINY = dict(resolution=32, base_channels=8, channel_mult=[1, 2, 2], mid_blocks=0, norm_groups=4)


def _save_tiny(path, preset: str = "fsq-8x8", seed: int = 0):
    torch.manual_seed(seed)
    ImageTokenizer(preset_config(preset, **TINY)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fsq_dir(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tok") / "fsq")


def _reference(tokenizer_dir, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """What extraction must produce: the tokenizer's own encode, batch by batch."""
    model = ImageTokenizer.from_pretrained(tokenizer_dir).eval()
    x = pixels.float() / 127.5 - 1.0
    return torch.cat([model.encode(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def test_cli_round_trip_equals_encode(fsq_dir, tmp_path, capsys):
    out = tmp_path / "codes"
    args = ["--tokenizer", str(fsq_dir), "--dataset", "shapes", "--num", "20", "--resolution", "32"]
    args += ["--out", str(out), "--seed", "3", "--batch_size", "8", "--shard_size", "8", "--no_progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote 20 codes (8x8 tokens, int16) to {out} [3 shards]" in printed
    assert "skipped 0 samples" in printed
    data = load_codes(out, expect=ImageTokenizer.from_pretrained(fsq_dir))
    pixels, captions, keys, _ = samples_tensor("shapes", 20, 32, seed=3)
    assert torch.equal(data.tokens, _reference(fsq_dir, pixels, 8))
    assert data.captions == captions and data.keys == keys
    extra = data.meta["extra_meta"]
    assert (extra["source"], extra["requested"], extra["seed"], extra["split"]) == ("shapes", 20, 3, "train")
    assert data.identity["name_or_path"] == str(fsq_dir.resolve())


def test_folder_dataset_keeps_keys_and_non_ascii_captions(fsq_dir, tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    captions = {"a": "café crème", "b": "東京の夜 🌃", "sub/c": "naïve “quote”"}
    for i, (key, caption) in enumerate(captions.items()):
        noise_rgb(i, 40).save(folder / f"{key}.png")
        (folder / f"{key}.txt").write_text(caption, encoding="utf-8")
    out = extract_codes(fsq_dir, str(folder), 10, 32, tmp_path / "codes", progress=False)
    data = load_codes(out, expect=ImageTokenizer.from_pretrained(fsq_dir))
    assert dict(zip(data.keys, data.captions)) == captions
    pixels, _, keys, _ = samples_tensor(str(folder), 10, 32)
    assert keys == data.keys and torch.equal(data.tokens, _reference(fsq_dir, pixels, 256))
    assert data.meta["extra_meta"]["source"] == str(folder.resolve())


def test_continuous_latents_round_trip_as_float32(tmp_path):
    kl_dir = _save_tiny(tmp_path / "kl", "kl-8x8")
    out = extract_codes(kl_dir, "photos", 20, 32, tmp_path / "codes", batch_size=16, progress=False)
    data = load_codes(out, expect=ImageTokenizer.from_pretrained(kl_dir))
    assert data.meta["kind"] == "latents" and data.meta["dtype"] == "float32"
    assert data.tokens.dtype == torch.float32 and data.tokens.shape == (20, 8, 8, 4)
    pixels, captions, _, _ = samples_tensor("photos", 20, 32)
    assert torch.equal(data.tokens, _reference(kl_dir, pixels, 16))
    assert data.captions == captions


def test_codes_of_another_tokenizer_are_refused(fsq_dir, tmp_path):
    other = _save_tiny(tmp_path / "other", seed=1)
    out = extract_codes(fsq_dir, "shapes", 4, 32, tmp_path / "codes", progress=False)
    with pytest.raises(CodesMismatchError, match="data.extract_codes"):
        load_codes(out, expect=ImageTokenizer.from_pretrained(other))
    with pytest.raises(CodesMismatchError):
        load_codes(out, expect=tokenizer_identity(ImageTokenizer.from_pretrained(other)))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--num": "0"}, "--num must be >= 1"),
        ({"--batch_size": "0"}, "--batch_size must be >= 1"),
        ({"--shard_size": "-1"}, "--shard_size must be >= 1"),
        ({"--resolution": "0"}, "--resolution must be >= 1"),
        ({"--tokenizer": "MISSING"}, "is not a directory"),
        ({"--dataset": "nosuchdata"}, "unknown dataset 'nosuchdata'"),
        ({"--resolution": "30"}, "not a multiple of the tokenizer's downsampling factor 4"),
    ],
)
def test_cli_rejects_bad_args_before_work(fsq_dir, tmp_path, capsys, monkeypatch, change, message):
    def no_work(*args, **kwargs):
        raise AssertionError("data was read before the arguments were validated")

    monkeypatch.setattr(extract_module, "samples_tensor", no_work)
    args = {
        "--tokenizer": str(fsq_dir),
        "--dataset": "shapes",
        "--num": "4",
        "--resolution": "32",
        "--out": str(tmp_path / "codes"),
    }
    args.update({k: (str(tmp_path / v) if v == "MISSING" else v) for k, v in change.items()})
    assert main([item for pair in args.items() for item in pair]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "codes").exists()


def test_function_rejects_bad_args(fsq_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(extract_module, "samples_tensor", None)  # any work would fail
    with pytest.raises(ValueError, match="--num must be >= 1"):
        extract_codes(fsq_dir, "shapes", 0, 32, tmp_path / "codes")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        extract_codes(tmp_path / "empty", "shapes", 4, 32, tmp_path / "codes")
    with pytest.raises(ValueError, match="unknown split"):
        extract_codes(fsq_dir, "shapes", 4, 32, tmp_path / "codes", split="val")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        extract_codes(fsq_dir, "shapes", 4, 32, tmp_path / "full")
    with pytest.raises(FileExistsError, match="does not look like a codes directory"):
        extract_codes(fsq_dir, "shapes", 4, 32, tmp_path / "full", overwrite=True)
