"""Rectified-flow and shortcut self-consistency losses for :class:`~ar_model.diffusion_head.DiffusionHead`.

DESIGN §3. For data ``x1`` (the next continuous token), noise ``x0 ~ N(0, I)`` and ``t ∈ [0, 1]``:

* flow matching (rectified flow; Liu et al. 2022, arXiv:2209.03003; Lipman et al. 2022,
  arXiv:2210.02747): ``x_t = (1 − t)·x0 + t·x1``, loss ``‖v_θ(x_t, t, 0, c) − (x1 − x0)‖²``;
* shortcut self-consistency (Frans et al. 2024, arXiv:2410.12557) on a fraction of the rows, with
  ``d ∈ {1/2^L, …, 1/2}`` and ``t`` on the d-grid with ``t + 2d ≤ 1``:
  ``v_θ(x_t, t, 2d) ≈ sg[(v_θ(x_t, t, d) + v_θ(x_t + d·v_θ(x_t, t, d), t + d, d)) / 2]``;
  the teacher at the smallest ``d`` is queried at ``d = 0`` (the flow itself), as in the paper.

Each position gets ``samples_per_position`` draws of ``(x0, t)`` (MAR samples 4): the condition is
repeated, not the decoder trunk, so the expensive part runs once per step. Every random draw comes from
an optional ``torch.Generator``; the losses are computed in fp32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch

from ar_model.diffusion_head import DiffusionHead

TIME_SAMPLINGS: tuple[str, ...] = ("uniform", "logit_normal")


@dataclass
class FlowLossConfig:
    """Training options of the flow loss (saved in the decoder's ``config.json`` as a dict)."""

    weight: float = 1.0  # weight of the flow loss in the decoder's total loss (text CE + weight · flow)
    samples_per_position: int = 4  # (x0, t) draws per target token and step (MAR: 4)
    time_sampling: str = "uniform"  # "uniform" t ~ U(0, 1) | "logit_normal" t = sigmoid(N(mean, std²))
    logit_mean: float = 0.0  # logit-normal location (Esser et al. 2024, SD3, arXiv:2403.03206)
    logit_std: float = 1.0  # logit-normal scale
    shortcut_fraction: float = 0.25  # rows trained with self-consistency (Frans et al.: 1/8 to 1/4)
    # Std of Gaussian noise added to the latents the decoder *reads* (teacher-forced inputs in training
    # and validation, fed-back samples in generation), never to the flow targets. Continuous latents of
    # background tokens leak the colour and kind of nearby shapes; read cleanly, they let the model
    # predict an image from its own earlier latents and ignore the caption (README, issue 4).
    input_noise: float = 0.0

    def __post_init__(self) -> None:
        spp = self.samples_per_position
        if isinstance(spp, bool) or not isinstance(spp, int) or spp < 1:
            raise ValueError(f"FlowLossConfig: samples_per_position must be an int >= 1, got {spp!r}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(
                f"FlowLossConfig: time_sampling must be one of {TIME_SAMPLINGS}, got {self.time_sampling!r}"
            )
        if not self.weight >= 0 or not self.logit_std > 0 or not 0 <= self.shortcut_fraction < 1:
            raise ValueError(
                f"FlowLossConfig: need weight >= 0, logit_std > 0, 0 <= shortcut_fraction < 1; got "
                f"{self.weight}, {self.logit_std}, {self.shortcut_fraction}"
            )
        if not self.input_noise >= 0:
            raise ValueError(f"FlowLossConfig: input_noise must be >= 0, got {self.input_noise}")
        self.input_noise = float(self.input_noise)
        self.weight, self.logit_mean = float(self.weight), float(self.logit_mean)
        self.logit_std, self.shortcut_fraction = float(self.logit_std), float(self.shortcut_fraction)

    @classmethod
    def from_any(cls, value: FlowLossConfig | dict[str, Any] | None) -> FlowLossConfig:
        """A config from itself, a dict (``config.json``) or None (the defaults); unknown keys raise."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"FlowLossConfig: expected a dict, got {type(value).__name__}")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"FlowLossConfig: unknown key(s) {unknown}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FlowLoss(NamedTuple):
    """The flow loss and its parts (fp32 scalars). ``loss`` is the mean over all rows (flow and shortcut),
    ``flow`` and ``shortcut`` the means over their own rows (0 when a part has no rows)."""

    loss: torch.Tensor
    flow: torch.Tensor
    shortcut: torch.Tensor


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow path ``x_t = (1 − t)·x0 + t·x1`` for ``x0, x1 (N, D)`` and ``t (N,)``."""
    t = t[:, None]  # (N, 1)
    return (1 - t) * x0 + t * x1


def sample_times(
    n: int,
    config: FlowLossConfig,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``(n,)`` fp32 times: ``U(0, 1)`` or logit-normal ``sigmoid(N(mean, std²))``."""
    if config.time_sampling == "uniform":
        return torch.rand(n, generator=generator, device=device)
    z = torch.randn(n, generator=generator, device=device)
    return torch.sigmoid(config.logit_mean + config.logit_std * z)


def sample_shortcut_steps(
    n: int, levels: int, generator: torch.Generator | None = None, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher step sizes ``d = 2^-k``, k uniform in ``1..levels``, and times ``t = i·d`` with ``i`` uniform
    in ``0 .. 1/d − 2`` (so ``t + 2d ≤ 1``); both ``(n,)`` fp32 (Frans et al. 2024, §3)."""
    k = torch.randint(1, levels + 1, (n,), generator=generator, device=device)  # (n,)
    d = torch.pow(2.0, -k.float())  # (n,)
    slots = torch.pow(2.0, k.float()) - 1  # (n,): number of grid times t with t + 2d <= 1
    i = torch.floor(torch.rand(n, generator=generator, device=device) * slots).clamp(max=slots - 1)
    return i * d, d


def _row_sq_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(N,)`` mean squared error per row, in fp32."""
    return (pred.float() - target.float()).pow(2).mean(dim=-1)


def flow_matching_loss(
    head: DiffusionHead,
    cond: torch.Tensor,
    target: torch.Tensor,
    config: FlowLossConfig | None = None,
    generator: torch.Generator | None = None,
) -> FlowLoss:
    """Flow-matching + shortcut loss of ``head`` for conditions ``cond (N, C)`` and data ``target (N, D)``.

    Each position is drawn ``samples_per_position`` times (``M = N·K`` rows); a random
    ``round(shortcut_fraction · M)`` of the rows train self-consistency (if the head has shortcut
    levels), the rest plain flow matching at ``d = 0``. ``N = 0`` gives zero losses that still touch
    every head parameter (so data-parallel training sees a gradient for each one).
    """
    cfg = config if config is not None else FlowLossConfig()
    if cond.dim() != 2 or target.dim() != 2 or cond.shape[0] != target.shape[0]:
        raise ValueError(
            f"flow_matching_loss: need cond (N, C) and target (N, D), got {tuple(cond.shape)}, "
            f"{tuple(target.shape)}"
        )
    levels = head.config.shortcut_levels
    if cfg.shortcut_fraction > 0 and levels == 0:
        raise ValueError("flow_matching_loss: shortcut_fraction > 0 needs a head with shortcut_levels > 0")
    device = cond.device
    k = cfg.samples_per_position
    n, c = cond.shape
    m = n * k
    cond_rep = cond.unsqueeze(0).expand(k, n, c).reshape(m, c)  # (K, N, C) -> (M, C): sample-major
    x1 = target.float().unsqueeze(0).expand(k, *target.shape).reshape(m, target.shape[1])  # (M, D)
    x0 = torch.randn(x1.shape, generator=generator, device=device)  # (M, D) fp32 noise
    num_short = round(cfg.shortcut_fraction * m)
    perm = torch.randperm(m, generator=generator, device=device)  # (M,)
    short_rows, flow_rows = perm[:num_short], perm[num_short:]

    # Plain flow matching at d = 0: target velocity x1 - x0.
    xf0, xf1, cf = x0[flow_rows], x1[flow_rows], cond_rep[flow_rows]  # (Mf, D), (Mf, D), (Mf, C)
    t = sample_times(xf0.shape[0], cfg, generator, device)  # (Mf,)
    v = head(interpolate(xf0, xf1, t), t, 0.0, cf)  # (Mf, D)
    flow_err = _row_sq_error(v, xf1 - xf0)  # (Mf,)

    short_err = x0.new_zeros(0)
    if num_short:
        xs0, xs1, cs = x0[short_rows], x1[short_rows], cond_rep[short_rows]  # (Ms, D), (Ms, D), (Ms, C)
        t, d = sample_shortcut_steps(num_short, levels, generator, device)  # (Ms,), (Ms,)
        x_t = interpolate(xs0, xs1, t)  # (Ms, D)
        with torch.no_grad():  # sg[...]: two d-steps of the current head are the target of one 2d-step
            d_teacher = torch.where(d <= 2.0**-levels, torch.zeros_like(d), d)  # smallest d: the flow itself
            v1 = head(x_t, t, d_teacher, cs).float()  # (Ms, D)
            v2 = head(x_t + d[:, None] * v1, t + d, d_teacher, cs).float()  # (Ms, D)
            v_target = (v1 + v2) / 2
        short_err = _row_sq_error(head(x_t, t, 2 * d, cs), v_target)  # (Ms,)

    total = (flow_err.sum() + short_err.sum()) / max(m, 1)
    flow = flow_err.sum() / max(flow_err.numel(), 1)
    shortcut = short_err.sum() / max(short_err.numel(), 1)
    return FlowLoss(loss=total, flow=flow, shortcut=shortcut)
