"""A tokenizer folder from a stranger never runs code: pickles are refused and ``auto_map`` is ignored."""

from __future__ import annotations

import pickle

import pytest
import torch
from fault_launch import PicklePayload, plant_remote_code
from transformers import AutoModel

from tokenizers_mm import ImageTokenizer
from tokenizers_mm.presets import preset_config

TINY = dict(base_channels=8, channel_mult=[1, 2, 2], mid_blocks=0, norm_groups=4)


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tok"
    ImageTokenizer(preset_config("fsq-8x8", resolution=32, **TINY)).save_pretrained(path)
    return path


@pytest.mark.parametrize("load", [ImageTokenizer.from_pretrained, AutoModel.from_pretrained])
def test_pickled_weights_are_refused(folder, tmp_path, load):
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    PicklePayload(marker).save(folder / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load(folder)
    assert not marker.exists()
    # The control: the same file, unpickled without weights_only, runs its code.
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_a_pickle_beside_the_safetensors_is_never_opened(folder, tmp_path):
    marker = tmp_path / "pwned"
    PicklePayload(marker).save(folder / "pytorch_model.bin")
    reference = ImageTokenizer.from_pretrained(folder, use_safetensors=True)
    model = ImageTokenizer.from_pretrained(folder)
    assert all(
        torch.equal(a, b) for a, b in zip(reference.state_dict().values(), model.state_dict().values())
    )
    assert not marker.exists()


@pytest.mark.parametrize("load", [ImageTokenizer.from_pretrained, AutoModel.from_pretrained])
def test_code_in_the_folder_is_never_run(folder, tmp_path, load):
    marker = tmp_path / "pwned"
    plant_remote_code(folder, marker)
    with pytest.raises(ValueError, match="auto_map"):  # an unknown config key: refused outright
        load(folder)
    assert not marker.exists()
