"""PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial
Networks") with the hinge loss, as used by VQGAN. Needs no pretrained weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """Pixels (b, 3, H, W) → real/fake logits per patch, (b, 1, H/4 - 1, W/4 - 1) with 2 downsamplings."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_down: int = 2):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        c = channels
        for _ in range(n_down - 1):
            layers += [nn.Conv2d(c, c * 2, 4, stride=2, padding=1), nn.GroupNorm(8, c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        layers += [
            nn.Conv2d(c, c, 3, padding=1),
            nn.GroupNorm(8, c),
            nn.LeakyReLU(0.2),
            nn.Conv2d(c, 1, 4, padding=1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(G(x)))), halved."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
