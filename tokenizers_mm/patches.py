"""Raw patches, the "lossless input" tokenizer: an image is cut into p×p pixel patches and each
patch, flattened to p·p·C values, is one continuous token. No encoder, no decoder, no loss.

Within a token the values are ordered (row, column, channel), channel fastest, as in MAR.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenizers_mm.bottleneck_output import BottleneckOutput


def _check_patch_size(p: int) -> None:
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"patch size must be a positive int, got {p!r}")


def patchify(pixels: torch.Tensor, p: int) -> torch.Tensor:
    """Pixels (b, C, H, W) -> tokens (b, H/p, W/p, p*p*C). H and W must be multiples of p."""
    _check_patch_size(p)
    if pixels.ndim != 4:
        raise ValueError(f"patchify expects pixels (b, C, H, W), got shape {tuple(pixels.shape)}")
    b, c, h, w = pixels.shape
    if h % p or w % p:
        raise ValueError(
            f"image size {h}×{w} does not fit patch size {p}: height and width must be multiples of {p}"
        )
    x = pixels.reshape(b, c, h // p, p, w // p, p)  # (b, c, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (b, gh, gw, p_row, p_col, c)
    return x.reshape(b, h // p, w // p, p * p * c)  # (b, gh, gw, p*p*c)


def unpatchify(tokens: torch.Tensor, p: int) -> torch.Tensor:
    """Tokens (b, gh, gw, p*p*C) -> pixels (b, C, gh*p, gw*p); the exact inverse of ``patchify``."""
    _check_patch_size(p)
    if tokens.ndim != 4:
        raise ValueError(f"unpatchify expects tokens (b, h, w, p*p*C), got shape {tuple(tokens.shape)}")
    b, gh, gw, d = tokens.shape
    if d % (p * p):
        raise ValueError(f"token dim {d} is not a multiple of p*p = {p * p} for patch size {p}")
    c = d // (p * p)
    x = tokens.reshape(b, gh, gw, p, p, c)  # (b, gh, gw, p_row, p_col, c)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (b, c, gh, p_row, gw, p_col)
    return x.reshape(b, c, gh * p, gw * p)  # (b, c, H, W)


class RawPatches(nn.Module):
    """Identity bottleneck over patch tokens; ``encode``/``decode`` are ``patchify``/``unpatchify``."""

    def __init__(self, patch_size: int, channels: int = 3):
        super().__init__()
        _check_patch_size(patch_size)
        self.patch_size = patch_size
        self.channels = channels

    @property
    def token_dim(self) -> int:
        """Values per token: p·p·C."""
        return self.patch_size * self.patch_size * self.channels

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, token_dim={self.token_dim}"

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(b, C, H, W) -> (b, H/p, W/p, p*p*C)."""
        return patchify(pixels, self.patch_size)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, h, w, p*p*C) -> (b, C, h*p, w*p)."""
        return unpatchify(tokens, self.patch_size)

    def forward(self, z: torch.Tensor) -> BottleneckOutput:
        """Tokens (..., p*p*C) pass through unchanged; no indices, zero loss."""
        if z.shape[-1] != self.token_dim:
            raise ValueError(f"RawPatches expects tokens (..., {self.token_dim}), got shape {tuple(z.shape)}")
        loss = torch.zeros((), device=z.device, dtype=z.dtype)
        return BottleneckOutput(quantized=z, indices=None, loss=loss, metrics={})
