"""Decoder and generator folders from a stranger never run code: pickles are refused, ``auto_map`` ignored."""

from __future__ import annotations

import pickle

import pytest
import torch
from fault_launch import PicklePayload, plant_remote_code
from transformers import AutoModelForCausalLM

from ar_model.config import MMDecoderConfig, vocab_layout
from ar_model.generator import IMAGE_TOKENIZER_DIR, MMGenerator
from ar_model.modeling import MMDecoderForCausalLM
from tokenizers_mm import ImageTokenizer
from tokenizers_mm.presets import preset_config

TINY_TOKENIZER = dict(base_channels=8, channel_mult=[1, 2, 2], mid_blocks=0, norm_groups=4)


@pytest.fixture
def decoder(text_tokenizer) -> MMDecoderForCausalLM:
    torch.manual_seed(0)
    layout = vocab_layout(text_tokenizer, 1000)  # FSQ [8, 5, 5, 5]
    return MMDecoderForCausalLM(MMDecoderConfig(**layout, hidden_size=32, num_layers=1, num_heads=2)).eval()


def _load_or_refuse(load, folder, cls) -> None:
    """The folder loads as our own class, or is refused for its unknown ``auto_map`` key."""
    try:
        model = load(folder)
    except ValueError as e:
        assert "auto_map" in str(e)
    else:
        assert type(model) is cls


@pytest.mark.parametrize("load", [MMDecoderForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained])
def test_decoder_folder_with_pickled_weights_is_refused(decoder, tmp_path, load):
    folder, marker = tmp_path / "dec", tmp_path / "pwned"
    decoder.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    PicklePayload(marker).save(folder / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load(folder)
    assert not marker.exists()


@pytest.mark.parametrize("load", [MMDecoderForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained])
def test_code_in_a_decoder_folder_is_never_run(decoder, tmp_path, load):
    folder, marker = tmp_path / "dec", tmp_path / "pwned"
    decoder.save_pretrained(folder)
    plant_remote_code(folder, marker)
    _load_or_refuse(load, folder, MMDecoderForCausalLM)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["decoder", "image_tokenizer", "remote_code"])
def test_generator_folder_never_runs_its_files(decoder, text_tokenizer, tmp_path, where):
    torch.manual_seed(0)
    image_tokenizer = ImageTokenizer(preset_config("fsq-8x8", resolution=16, **TINY_TOKENIZER))
    folder, marker = tmp_path / "gen", tmp_path / "pwned"
    MMGenerator(decoder, text_tokenizer, image_tokenizer).save_pretrained(folder)
    if where == "remote_code":
        plant_remote_code(folder, marker)
        _load_or_refuse(MMGenerator.from_pretrained, folder, MMGenerator)
    else:
        sub = folder if where == "decoder" else folder / IMAGE_TOKENIZER_DIR
        (sub / "model.safetensors").unlink()
        PicklePayload(marker).save(sub / "pytorch_model.bin")
        with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as nothing ran
            MMGenerator.from_pretrained(folder)
    assert not marker.exists()
