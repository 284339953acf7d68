"""Image quality metrics and the SSIM loss term: PSNR and SSIM on pixels in [-1, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images (b, c, h, w) in [-1, 1], computed on the [0, 1] scale.

    Reconstructions are clamped to the valid range first, as they would be when saved.
    """
    x = (x.float().clamp(-1, 1) + 1) / 2
    y = (y.float().clamp(-1, 1) + 1) / 2
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    window = g[:, None] * g[None, :]  # (size, size)
    return window.expand(channels, 1, size, size).to(like.dtype).contiguous()  # (c, 1, k, k)


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, "Image quality assessment: from error visibility to structural
    similarity") for images (b, c, h, w) in [-1, 1], Gaussian window 11/1.5, K1=0.01, K2=0.03 on [0, 1].

    Differentiable, so it serves as a loss term (``1 - ssim``) too. The window shrinks for tiny images.
    """
    x = (x.float().clamp(-1, 1) + 1) / 2
    y = (y.float().clamp(-1, 1) + 1) / 2
    c = x.shape[1]
    k = min(window_size, x.shape[-1], x.shape[-2])
    w = _gaussian_window(k, sigma, c, x)
    mu_x = F.conv2d(x, w, groups=c)
    mu_y = F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x**2
    syy = F.conv2d(y * y, w, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """Usage (fraction of codes used at least once) and perplexity (exp of the code-distribution entropy)."""
    counts = counts.double()
    total = counts.sum().clamp_min(1)
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_usage": float((counts > 0).double().mean()), "perplexity": float(entropy.exp())}
