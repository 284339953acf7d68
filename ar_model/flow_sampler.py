"""Sampling continuous tokens from a :class:`~ar_model.diffusion_head.DiffusionHead` (DESIGN §3).

Integrates ``dx/dt = v_θ(x, t, d, c)`` from noise at ``t = 0`` to data at ``t = 1`` with Euler or Heun
steps. With a shortcut-trained head (Frans et al. 2024, arXiv:2410.12557) the head is told the step
size ``d = 1/steps``, which makes 1, 2 or 4 steps usable; longer schedules use ``d = 0`` (the flow).
Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) is applied to the velocity,
``v = v_u + w·(v_c − v_u)``, with the cond and uncond rows in one batched head call, optionally only on
the steps that start inside a guidance interval of flow time (Kynkäänniemi et al. 2024,
arXiv:2404.07724, "Applying Guidance in a Limited Interval"; steps outside it run the cond rows alone,
a smaller head call). The head is kept
separate from this loop (as MAR's ``diffloss.py`` keeps training and sampling apart); the pipeline owns
the loop over tokens and calls this once per token (or per group of tokens).
"""

from __future__ import annotations

import torch

from ar_model.diffusion_head import DiffusionHead

METHODS: tuple[str, ...] = ("euler", "heun")
CFG_SCHEDULES: tuple[str, ...] = ("constant", "linear")


def shortcut_step_size(head: DiffusionHead, steps: int) -> float:
    """The ``d`` to condition on for a ``steps``-step schedule: ``1/steps`` when the head was trained on
    shortcuts that large (``1/steps ≥ 2^-(levels-1)``), else 0 (plain flow, e.g. 50-step Euler)."""
    min_step = head.config.min_student_step
    if min_step == 0 or 1.0 / steps < min_step:
        return 0.0
    return 1.0 / steps


def guidance_at(
    guidance_scale: float | torch.Tensor, progress: float | torch.Tensor, schedule: str = "constant"
) -> float | torch.Tensor:
    """The guidance scale at ``progress ∈ [0, 1]``: constant ``w``, or linear ``1 + (w − 1)·progress``
    (MAR's linear CFG schedule, there over the generated tokens; here over whatever progress the caller
    passes: flow time inside :func:`sample_flow`, or the fraction of image tokens generated)."""
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return guidance_scale
    return 1 + (guidance_scale - 1) * progress


def check_guidance_interval(interval: tuple[float, float] | None) -> tuple[float, float]:
    """``interval`` as ``(lo, hi)`` with ``0 ≤ lo < hi ≤ 1``; None is ``(0, 1)`` (every step guided)."""
    if interval is None:
        return (0.0, 1.0)
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(
            f"guidance_interval must be a pair (lo, hi) of flow times, got {interval!r}"
        ) from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(
            f"guidance_interval needs 0 <= lo < hi <= 1 (flow time, 0 = noise), got {interval!r}"
        )
    return (lo, hi)


def in_guidance_interval(t0: float, interval: tuple[float, float]) -> bool:
    """Whether a step that starts at flow time ``t0`` is guided: ``lo ≤ t0 < hi`` (steps start before
    ``t = 1``, so ``(0, 1)`` guides every step)."""
    lo, hi = interval
    return lo <= t0 < hi


def guided_velocity(
    head: DiffusionHead,
    x: torch.Tensor,
    t: float,
    d: float,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    scale: float | torch.Tensor,
) -> torch.Tensor:
    """``v_u + w·(v_c − v_u)`` for ``x (N, D)``, ``cond (N, C)``, ``uncond`` broadcastable to ``cond``.

    One head call on ``2N`` rows ``[cond; uncond]``. A scale that is exactly 1 (a float) skips the
    uncond rows, so ``guidance_scale=1`` is bit-for-bit the unguided sampler. A tensor scale is per row
    ``(N,)``.
    """
    if uncond is None or (not isinstance(scale, torch.Tensor) and scale == 1.0):
        return head(x, t, d, cond).float()
    n = x.shape[0]
    both = head(
        torch.cat([x, x]),  # (2N, D)
        t,
        d,
        torch.cat([cond, uncond.expand_as(cond)]),  # (2N, C): cond rows, then uncond rows
    ).float()
    v_c, v_u = both[:n], both[n:]  # (N, D) each
    w = scale[:, None].float() if isinstance(scale, torch.Tensor) else scale  # (N, 1) or float
    return v_u + w * (v_c - v_u)


@torch.no_grad()
def sample_flow(
    head: DiffusionHead,
    cond: torch.Tensor,
    steps: int,
    *,
    method: str = "euler",
    temperature: float = 1.0,
    guidance_scale: float | torch.Tensor = 1.0,
    uncond: torch.Tensor | None = None,
    cfg_schedule: str = "constant",
    shortcut: bool = True,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Samples ``(N, D)`` in fp32, one per condition row ``cond (N, C)``.

    Args:
        steps: integration steps over ``[0, 1]`` (uniform grid); Heun costs two head calls per step.
        method: "euler" (``x += h·v(x, t)``) or "heun" (Euler predictor, trapezoidal corrector).
        temperature: scales the initial noise ``x0 = temperature · N(0, I)`` (MAR's temperature).
        guidance_scale: CFG scale ``w`` (float, or a tensor ``(N,)`` per row); needs ``uncond``.
        uncond: unconditional condition(s) broadcastable to ``cond`` (e.g. the hidden state after an
            empty caption), or None for no guidance.
        cfg_schedule: "constant", or "linear" in flow time ``1 + (w − 1)·t_mid`` of each step.
        shortcut: condition on ``d = 1/steps`` (:func:`shortcut_step_size`); False always uses ``d = 0``.
        noise: the initial noise ``(N, D)`` instead of drawing it (temperature still applies).
        generator: source of the initial noise, for reproducible samples.
        guidance_interval: ``(lo, hi)`` in flow time: only steps starting at ``lo ≤ t0 < hi`` are
            guided, the others use the cond velocity alone (None or ``(0, 1)``: every step).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
    if cond.dim() != 2:
        raise ValueError(f"cond must be (N, C), got {tuple(cond.shape)}")
    interval = check_guidance_interval(guidance_interval)
    guided = isinstance(guidance_scale, torch.Tensor) or guidance_scale != 1.0
    if guided and uncond is None:
        raise ValueError("guidance_scale != 1 needs uncond (the unconditional condition)")
    shape = (cond.shape[0], head.latent_dim)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=cond.device)
    elif noise.shape != shape:
        raise ValueError(f"noise must be {shape}, got {tuple(noise.shape)}")
    x = noise.float() * temperature  # (N, D)
    d = shortcut_step_size(head, steps) if shortcut else 0.0
    h = 1.0 / steps
    for i in range(steps):
        t0, t1 = i * h, (i + 1) * h
        w = guidance_at(guidance_scale, (t0 + t1) / 2, cfg_schedule)
        step_uncond = uncond if in_guidance_interval(t0, interval) else None  # None: cond rows only
        v = guided_velocity(head, x, t0, d, cond, step_uncond, w)  # (N, D)
        if method == "euler":
            x = x + h * v
        else:
            v_next = guided_velocity(head, x + h * v, t1, d, cond, step_uncond, w)  # (N, D)
            x = x + h * (v + v_next) / 2
    return x
