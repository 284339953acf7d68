"""The convolutional encoder and decoder shared by every Stage-1 bottleneck.

A VQGAN-style stack (Esser et al. 2021) kept small for CPU training: residual blocks at each level,
stride-2 convolutions to downsample, nearest-neighbour upsampling plus a convolution to go back up.
Capacity is cheap at low resolution, so ``channel_mult`` normally grows as the grid shrinks.
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(channels: int, groups: int) -> nn.Module:
    if groups <= 0:
        return nn.Identity()
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=1e-6)


class ResBlock(nn.Module):
    """norm → SiLU → conv3×3 → norm → SiLU → conv3×3, plus a (1×1-projected) skip."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.block = nn.Sequential(
            _norm(c_in, groups),
            nn.SiLU(),
            nn.Conv2d(c_in, c_out, 3, padding=1),
            _norm(c_out, groups),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class Encoder(nn.Module):
    """Pixels (b, 3, H, W) → features (b, out_channels, H/f, W/f) with f = 2**(len(channel_mult)-1)."""

    def __init__(
        self,
        in_channels: int,
        base_channels: int,
        channel_mult: list[int],
        num_res_blocks: int,
        mid_blocks: int,
        out_channels: int,
        norm_groups: int,
    ):
        super().__init__()
        chans = [base_channels * m for m in channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, chans[0], 3, padding=1)]
        c = chans[0]
        for level, c_level in enumerate(chans):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(c, c_level, norm_groups))
                c = c_level
            if level < len(chans) - 1:
                layers.append(nn.Conv2d(c, c, 4, stride=2, padding=1))  # (b, c, H, W) → (b, c, H/2, W/2)
        layers += [ResBlock(c, c, norm_groups) for _ in range(mid_blocks)]
        layers += [_norm(c, norm_groups), nn.SiLU(), nn.Conv2d(c, out_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Latents (b, in_channels, h, w) → pixels (b, 3, h·f, w·f), mirroring the encoder."""

    def __init__(
        self,
        in_channels: int,
        base_channels: int,
        channel_mult: list[int],
        num_res_blocks: int,
        mid_blocks: int,
        out_channels: int,
        norm_groups: int,
    ):
        super().__init__()
        chans = [base_channels * m for m in channel_mult][::-1]
        c = chans[0]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, padding=1)]
        layers += [ResBlock(c, c, norm_groups) for _ in range(mid_blocks)]
        for level, c_level in enumerate(chans):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(c, c_level, norm_groups))
                c = c_level
            if level < len(chans) - 1:
                # (b, c, h, w) → (b, c, 2h, 2w)
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [_norm(c, norm_groups), nn.SiLU(), nn.Conv2d(c, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
