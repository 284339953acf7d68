"""Tiny models shared by the tests: real classes at sizes that train in seconds on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import torch

# A 4-level encoder/decoder with 8 base channels: the smallest conv autoencoder of the presets' shape.
TINY_TOKENIZER = dict(base_channels=8, channel_mult=[1, 2, 2], mid_blocks=0, norm_groups=4)


def save_tiny_tokenizer(path: str | Path, seed: int = 0, preset: str = "fsq-8x8") -> Path:
    """An untrained ``preset`` tokenizer at 32 px (FSQ: 1000 codes, 8×8 tokens) saved to ``path``."""
    from tokenizers_mm import ImageTokenizer
    from tokenizers_mm.presets import preset_config

    torch.manual_seed(seed)
    ImageTokenizer(preset_config(preset, resolution=32, **TINY_TOKENIZER)).save_pretrained(path)
    return Path(path)
