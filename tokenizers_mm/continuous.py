"""Continuous latents for the diffusion head: a KL-regularized (diagonal Gaussian) or a
noise-regularized bottleneck, plus the per-channel latent statistics that Stage 2 normalizes with.

KL (Kingma & Welling 2014, as in the LDM autoencoder): the encoder emits (mean, logvar) as
``2*dim`` channels; training samples ``mean + std * eps``, eval returns the mean.
Noise: the encoder emits ``dim`` channels; training adds N(0, noise_std²).

Shape legend: ``...`` leading dims (batch, height, width), ``c`` = dim latent channels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from tokenizers_mm.bottleneck_output import BottleneckOutput

KINDS = ("kl", "noise")
# logvar range as in the LDM autoencoder: keeps exp(logvar) finite early in training.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean, exp(logvar)) ‖ N(0, 1)) = ½(mean² + σ² − 1 − log σ²)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class ContinuousBottleneck(nn.Module):
    """Continuous bottleneck over channel-last input. ``in_dim`` is what the encoder must output:
    ``2*dim`` for ``kind="kl"`` (mean then logvar), ``dim`` for ``kind="noise"``. The output
    ``quantized`` is (..., dim), so for "kl" it has half the input's channels.

    Sampling (the reparameterized draw for "kl", the added noise for "noise") is the training-only
    behaviour: ``forward(z, sample=None)`` samples when ``self.training``; pass ``sample`` to choose.
    """

    def __init__(
        self,
        dim: int,
        kind: str = "kl",
        kl_weight: float = 1e-6,
        noise_std: float = 0.1,
        latent_l2_weight: float = 0.0,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if kl_weight < 0 or noise_std < 0 or latent_l2_weight < 0:
            raise ValueError("kl_weight, noise_std and latent_l2_weight must be >= 0")
        self.dim = dim
        self.kind = kind
        self.kl_weight = kl_weight  # weight of the per-element mean KL ("kl")
        self.noise_std = noise_std  # std of the training noise ("noise")
        # "noise" only: optional weight of mean(z²), which keeps the latents from growing to drown
        # out the fixed-size noise. 0 by default (no loss), as in plain noise regularization.
        self.latent_l2_weight = latent_l2_weight

    @property
    def in_dim(self) -> int:
        """Channels the encoder must produce for this bottleneck."""
        return 2 * self.dim if self.kind == "kl" else self.dim

    def extra_repr(self) -> str:
        extra = f"kl_weight={self.kl_weight}" if self.kind == "kl" else f"noise_std={self.noise_std}"
        return f"dim={self.dim}, kind={self.kind!r}, {extra}"

    def _split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., 2c) -> mean (..., c), clamped logvar (..., c)."""
        mean, logvar = z.chunk(2, dim=-1)  # (..., 2c) -> 2 x (..., c)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def _check(self, z: torch.Tensor) -> None:
        if z.shape[-1] != self.in_dim:
            what = "mean and logvar" if self.kind == "kl" else "latents"
            raise ValueError(
                f"ContinuousBottleneck(kind={self.kind!r}, dim={self.dim}) expects channel-last input "
                f"(..., {self.in_dim}) ({what}), got shape {tuple(z.shape)}"
            )

    def deterministic(self, z: torch.Tensor) -> torch.Tensor:
        """The latent without sampling (mean for "kl", input for "noise"): (..., in_dim) -> (..., c)."""
        self._check(z)
        return self._split(z)[0] if self.kind == "kl" else z

    def forward(
        self, z: torch.Tensor, sample: bool | None = None, generator: torch.Generator | None = None
    ) -> BottleneckOutput:
        """z: (..., in_dim) -> quantized (..., dim), indices None, loss scalar.

        sample: draw from the posterior / add noise; defaults to ``self.training``.
        generator: source of the sampling noise (on z's device), for reproducible training.
        """
        self._check(z)
        sample = self.training if sample is None else sample
        if self.kind == "kl":
            mean, logvar = self._split(z)
            latent = mean + (0.5 * logvar).exp() * _randn_like(mean, generator) if sample else mean
            kl = gaussian_kl(mean.float(), logvar.float()).mean()
            loss = (self.kl_weight * kl).to(z.dtype)
            metrics = {"kl": float(kl.detach()), "posterior_std": float((0.5 * logvar.detach()).exp().mean())}
            return BottleneckOutput(quantized=latent, indices=None, loss=loss, metrics=metrics)
        latent = z + self.noise_std * _randn_like(z, generator) if sample and self.noise_std > 0 else z
        l2 = z.float().square().mean()
        loss = (self.latent_l2_weight * l2).to(z.dtype)
        return BottleneckOutput(
            quantized=latent, indices=None, loss=loss, metrics={"latent_rms": float(l2.detach().sqrt())}
        )


def _stats_tensor(values: Sequence[float] | torch.Tensor, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Per-channel stats as a tensor that broadcasts against x along ``channel_dim``."""
    t = torch.as_tensor(values, dtype=x.dtype, device=x.device).reshape(-1)
    if t.numel() != x.shape[channel_dim]:
        raise ValueError(f"{t.numel()} latent stats for {x.shape[channel_dim]} channels (dim {channel_dim})")
    shape = [1] * x.ndim
    shape[channel_dim] = -1
    return t.reshape(shape)  # (c,) -> broadcastable, e.g. (1, 1, 1, c)


def normalize_latents(
    x: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    channel_dim: int = -1,
) -> torch.Tensor:
    """``(x - mean) / std`` per channel: the latents that Stage 2 sees."""
    return (x - _stats_tensor(mean, x, channel_dim)) / _stats_tensor(std, x, channel_dim)


def denormalize_latents(
    x: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    channel_dim: int = -1,
) -> torch.Tensor:
    """``x * std + mean`` per channel: the inverse of ``normalize_latents``."""
    return x * _stats_tensor(std, x, channel_dim) + _stats_tensor(mean, x, channel_dim)


def latent_stats(latents: Iterable[torch.Tensor], channel_dim: int = -1) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased, like ``torch.std``) std over a stream of latent batches.

    Each batch is reduced over every dim but ``channel_dim``; batches are merged with Chan et al.'s
    parallel update of (count, mean, M2) in float64, so many batches do not lose precision.
    """
    count = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    for x in latents:
        # float64 on the CPU: exact enough for any number of batches, and MPS has no float64.
        x = x.detach().to("cpu", torch.float64).movedim(channel_dim, -1)
        x = x.reshape(-1, x.shape[-1])  # (..., c) -> (n, c)
        n = x.shape[0]
        if n == 0:
            continue
        b_mean = x.mean(dim=0)  # (c,)
        b_m2 = (x - b_mean).square().sum(dim=0)  # (c,)
        if mean is None:
            count, mean, m2 = n, b_mean, b_m2
            continue
        if b_mean.shape != mean.shape:
            raise ValueError(
                f"latent batches disagree on the channel count: {mean.numel()} vs {b_mean.numel()}"
            )
        total = count + n
        delta = b_mean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + b_m2 + delta.square() * (count * n / total)
        count = total
    if mean is None or m2 is None or count < 2:
        raise ValueError("latent_stats needs at least two latent vectors")
    std = (m2 / (count - 1)).sqrt()
    return mean.tolist(), std.tolist()
