"""``DiffusionHead``: a small AdaLN MLP that predicts a flow velocity for one continuous token (DESIGN §3).

The decoder gives one hidden state per position; the head turns the hidden state ``c`` of position
``i`` into a velocity field over the latent of position ``i + 1``. This is MAR's "DiffLoss" head (Li et
al. 2024, "Autoregressive Image Generation without Vector Quantization", arXiv:2406.11838) with two
changes: it predicts a rectified-flow velocity instead of a DDPM noise, and it is also conditioned on
the step size ``d`` of shortcut models (Frans et al. 2024, "One Step Diffusion via Shortcut Models",
arXiv:2410.12557), so that it can jump ``d`` along the flow in one step.

Layout (legend: ``D`` latent_dim, ``C`` cond_dim, ``W`` width)::

    y = cond_proj(c) + time_embed(t) + step_embed(d)               # (..., W), the AdaLN condition
    h = input_proj(x_t)                                           # (..., W)
    h = h + gate · MLP(LN(h) · (1 + scale) + shift)   × depth     # shift/scale/gate = Linear(SiLU(y))
    v = out_proj(LN(h) · (1 + scale) + shift)                     # (..., D)

The modulation layers and ``out_proj`` start at zero (DiT, Peebles & Xie 2023, arXiv:2212.09748): every
block starts as the identity and the head predicts ``v = 0``. The training loss lives in
:mod:`ar_model.flow_matching`, the sampling loop in :mod:`ar_model.flow_sampler`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn


@dataclass
class DiffusionHeadConfig:
    """Architecture of :class:`DiffusionHead` (saved in the decoder's ``config.json`` as a dict)."""

    width: int = 256  # channels W of the residual stream and of the AdaLN condition
    depth: int = 3  # residual AdaLN blocks (MAR uses 3 to 12)
    mlp_ratio: float = 1.0  # hidden width of each block's MLP, in units of W (MAR: 1)
    frequency_dim: int = 256  # sinusoidal features of t and d before their MLPs
    time_scale: float = 1000.0  # t, d in [0, 1] are multiplied by this before the sinusoids
    # Shortcut step sizes: the head is conditioned on d ∈ {0} ∪ {2^-k, k = 0..shortcut_levels-1} and
    # trained by self-consistency from teachers at 2^-1 .. 2^-shortcut_levels (Frans et al. 2024 use 7:
    # d_min = 1/128). 0 = plain flow matching only, no step-size input.
    shortcut_levels: int = 7

    def __post_init__(self) -> None:
        for name in ("width", "depth", "frequency_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DiffusionHeadConfig: {name} must be an int >= 1, got {value!r}")
        if self.frequency_dim % 2:
            raise ValueError(f"DiffusionHeadConfig: frequency_dim must be even, got {self.frequency_dim}")
        if not self.mlp_ratio > 0 or not self.time_scale > 0:
            raise ValueError(
                f"DiffusionHeadConfig: need mlp_ratio > 0 and time_scale > 0, got {self.mlp_ratio}, "
                f"{self.time_scale}"
            )
        levels = self.shortcut_levels
        if isinstance(levels, bool) or not isinstance(levels, int) or not 0 <= levels <= 16:
            raise ValueError(
                f"DiffusionHeadConfig: shortcut_levels must be an int in [0, 16], got {levels!r}"
            )
        self.mlp_ratio = float(self.mlp_ratio)
        self.time_scale = float(self.time_scale)

    @classmethod
    def from_any(cls, value: DiffusionHeadConfig | dict[str, Any] | None) -> DiffusionHeadConfig:
        """A config from itself, a dict (``config.json``) or None (the defaults); unknown keys raise."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"DiffusionHeadConfig: expected a dict, got {type(value).__name__}")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"DiffusionHeadConfig: unknown key(s) {unknown}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def min_student_step(self) -> float:
        """Smallest step size trained as a shortcut *student* (``2^-(levels-1)``); 0 without shortcuts."""
        return 2.0 ** -(self.shortcut_levels - 1) if self.shortcut_levels else 0.0


def timestep_embedding(
    t: torch.Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal features ``[cos(s·t·ω_k), sin(s·t·ω_k)]``, ``ω_k = max_period^(-k / (dim/2))``, in fp32.

    The transformer position encoding (Vaswani et al. 2017) applied to a scalar time, as in DiT's
    ``TimestepEmbedder``; ``t (...)`` in [0, 1] is scaled by ``s`` so that the fastest frequency turns
    about ``s / 2π`` times over [0, 1]. Returns ``(..., dim)``.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # (half,)
    angles = (t.float() * scale)[..., None] * freqs  # (..., half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (..., dim)


class ScalarEmbedder(nn.Module):
    """``MLP(sinusoids(t))``: a scalar in [0, 1] (time t or step size d) to ``(..., W)``."""

    def __init__(self, width: int, frequency_dim: int, scale: float) -> None:
        super().__init__()
        self.frequency_dim, self.scale = frequency_dim, scale
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_embedding(t, self.frequency_dim, self.scale)  # (..., F) fp32
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # (..., W)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: ``x · (1 + scale) + shift`` (Perez et al. 2018 FiLM; DiT's adaLN)."""
    return x * (1 + scale) + shift


class AdaLNBlock(nn.Module):
    """``h + gate · MLP(modulate(LN(h), shift, scale))`` with ``(shift, scale, gate) = Linear(SiLU(y))``."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))  # zero init: identity block

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(y).chunk(3, dim=-1)  # 3 × (..., W)
        return h + gate * self.mlp(modulate(self.norm(h), shift, scale))


class FinalLayer(nn.Module):
    """``out_proj(modulate(LN(h), shift, scale))`` → ``(..., D)``; modulation and ``out_proj`` start at 0."""

    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out_proj = nn.Linear(width, out_dim)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(y).chunk(2, dim=-1)  # 2 × (..., W)
        return self.out_proj(modulate(self.norm(h), shift, scale))


class DiffusionHead(nn.Module):
    """Velocity ``v_θ(x_t, t, d, c)`` of one continuous token (MAR's DiffLoss MLP + shortcut step size).

    Args:
        latent_dim: channels ``D`` of a latent token.
        cond_dim: channels ``C`` of the condition (the decoder's hidden size).
        config: :class:`DiffusionHeadConfig` (or its dict).
    """

    def __init__(
        self, latent_dim: int, cond_dim: int, config: DiffusionHeadConfig | dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        cfg = DiffusionHeadConfig.from_any(config)
        if latent_dim < 1 or cond_dim < 1:
            raise ValueError(
                f"DiffusionHead: latent_dim and cond_dim must be >= 1, got {latent_dim}, {cond_dim}"
            )
        self.config, self.latent_dim, self.cond_dim = cfg, latent_dim, cond_dim
        w = cfg.width
        self.input_proj = nn.Linear(latent_dim, w)
        self.cond_proj = nn.Linear(cond_dim, w)
        self.time_embed = ScalarEmbedder(w, cfg.frequency_dim, cfg.time_scale)
        # No step-size input without shortcut training: an untrained d-embedding would only add noise.
        self.step_embed = (
            ScalarEmbedder(w, cfg.frequency_dim, cfg.time_scale) if cfg.shortcut_levels else None
        )
        hidden = max(1, round(w * cfg.mlp_ratio))
        self.blocks = nn.ModuleList([AdaLNBlock(w, hidden) for _ in range(cfg.depth)])
        self.final = FinalLayer(w, latent_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, init: ModuleType = nn.init) -> None:
        """Explicit init (DiT ``initialize_weights``): Xavier-uniform linears with zero biases, N(0, 0.02)
        for the t/d MLPs, and zeros for every AdaLN modulation and for ``out_proj``, so the head starts as
        ``v = 0`` with identity blocks. ``init`` is ``torch.nn.init`` or transformers' ``initialization``
        (whose functions skip tensors a checkpoint already filled)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init.xavier_uniform_(module.weight)
                init.zeros_(module.bias)
        for embedder in (self.time_embed, self.step_embed):
            if embedder is not None:
                for layer in (embedder.mlp[0], embedder.mlp[2]):
                    init.normal_(layer.weight, mean=0.0, std=0.02)
        for block in self.blocks:
            init.zeros_(block.modulation[1].weight)
            init.zeros_(block.modulation[1].bias)
        init.zeros_(self.final.modulation[1].weight)
        init.zeros_(self.final.modulation[1].bias)
        init.zeros_(self.final.out_proj.weight)
        init.zeros_(self.final.out_proj.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        d: torch.Tensor | float | None,
        cond: torch.Tensor,
    ) -> torch.Tensor:
        """Velocity ``(..., D)`` at ``x (..., D)``, time ``t`` and step size ``d`` (``(...)`` or scalars;
        ``d = 0`` or None is plain flow matching), given ``cond (..., C)``.

        Inputs are cast to the head's dtype; the output is in that dtype (the losses cast to fp32).
        """
        if x.shape[-1] != self.latent_dim or cond.shape[-1] != self.cond_dim:
            raise ValueError(
                f"DiffusionHead: expected x (..., {self.latent_dim}) and cond (..., {self.cond_dim}), got "
                f"{tuple(x.shape)} and {tuple(cond.shape)}"
            )
        lead = x.shape[:-1]
        dtype = self.input_proj.weight.dtype
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(lead)  # (...)
        y = self.cond_proj(cond.to(dtype)) + self.time_embed(t)  # (..., W)
        if self.step_embed is not None:
            d = torch.as_tensor(0.0 if d is None else d, dtype=torch.float32, device=x.device).expand(lead)
            y = y + self.step_embed(d)
        elif d is not None and bool(torch.as_tensor(d).ne(0).any()):
            raise ValueError("DiffusionHead: this head has no step-size input (shortcut_levels=0); pass d=0")
        h = self.input_proj(x.to(dtype))  # (..., W)
        for block in self.blocks:
            h = block(h, y)
        return self.final(h, y)  # (..., D)
