"""Named tokenizer presets. Parameter counts are checked by tests/tokenizers_mm/test_presets.py."""

from __future__ import annotations

from typing import Any

from tokenizers_mm.modeling import ImageTokenizer, ImageTokenizerConfig

# 32×32 images → 8×8 tokens (factor 4). Capacity sits at the 8×8 and 16×16 levels, where it is cheap.
_SMALL_AE: dict[str, Any] = dict(base_channels=32, channel_mult=[1, 2, 4], num_res_blocks=1, mid_blocks=1)

PRESETS: dict[str, dict[str, Any]] = {
    # FSQ [8,5,5,5] = 1000 implicit codes, 8×8 tokens at 32 px: the default discrete tokenizer.
    "fsq-8x8": dict(bottleneck="fsq", fsq_levels=[8, 5, 5, 5], **_SMALL_AE),
    # VQ with 1024 learned codes of dim 8, rotation-trick gradients, EMA codebook, k-means init, restarts.
    "vq-8x8": dict(bottleneck="vq", vq_codebook_size=1024, vq_dim=8, **_SMALL_AE),
    # Continuous KL latents, 4 channels per token: input to the diffusion head.
    "kl-8x8": dict(bottleneck="continuous", continuous_kind="kl", latent_channels=4, **_SMALL_AE),
    # Raw 4×4×3 patches: lossless, no parameters.
    "patches-4": dict(bottleneck="patches", patch_size=4),
    # GPU scale: 256 px → 16×16 tokens (factor 16), FSQ 2^16 codes.
    "fsq-f16-256": dict(
        bottleneck="fsq",
        fsq_levels=[8, 8, 8, 5, 5, 5],
        resolution=256,
        base_channels=128,
        channel_mult=[1, 1, 2, 2, 4],
        num_res_blocks=2,
        mid_blocks=2,
        norm_groups=32,
    ),
}

# Parameter counts, for the README and preset choice (asserted in tests).
PRESET_PARAMS: dict[str, int] = {
    "fsq-8x8": 1_616_743,  # 1.6M
    "vq-8x8": 1_621_867,  # 1.6M (the codebook is an EMA buffer, not a parameter)
    "kl-8x8": 1_617_259,  # 1.6M
    "patches-4": 1,  # no weights: one frozen placeholder scalar (see ImageTokenizer.__init__)
    "fsq-f16-256": 55_529_097,  # 55.5M
}


def preset_config(name: str, **overrides: Any) -> ImageTokenizerConfig:
    """Config of preset ``name`` with ``overrides`` applied (unknown keys raise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {list(PRESETS)}")
    return ImageTokenizerConfig(**{**PRESETS[name], **overrides})


def build_tokenizer(name: str, **overrides: Any) -> ImageTokenizer:
    return ImageTokenizer(preset_config(name, **overrides))
