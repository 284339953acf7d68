"""Continuous image generation: the decoder proposes a condition per token, the diffusion head samples it.

For each of the ``h * w`` image positions in raster order (causal image attention), the decoder's last
hidden state conditions :func:`~ar_model.flow_sampler.sample_flow`, which integrates the head's
velocity from noise to a latent in ``num_inference_steps`` steps (shortcut models make 1, 2 or 4
steps work, Frans et al. 2024, arXiv:2410.12557). The sampled latent is then fed back as the next
input token (the placeholder id ``config.latent_token_id`` with the latent embedded by
``latent_proj``) through the same KV-cached stepper as discrete generation, so the trunk runs once
per token (MAR, Li et al. 2024, arXiv:2406.11838, runs its head the same way).

Classifier-free guidance runs the cond rows and as many uncond rows (the empty caption) through the
trunk in one batch; the head's velocity is guided ``v_u + w (v_c − v_u)`` (DESIGN §3), with ``w``
constant or ramped linearly over the image's tokens (:func:`~ar_model.generation.guidance_scale_at`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ar_model.flow_sampler import check_guidance_interval, sample_flow
from ar_model.generation import (
    CFG_SCHEDULES,
    Generators,
    _as_rows,
    _image_rows,
    _Stepper,
    guidance_scale_at,
    left_pad,
)
from ar_model.masked_generation import default_num_iter, unmask_image_latents
from ar_model.positions import Segment

__all__ = ["generate_image_latents"]


def _initial_noise(b: int, dim: int, generator: Generators, device: torch.device) -> torch.Tensor:
    """``(b, dim)`` standard normal noise: from one generator, or row ``i`` from generator ``i``."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(b, dim, generator=generator, device=device)
    if len(generator) != b:
        raise ValueError(f"got {len(generator)} generators for {b} rows")
    return torch.stack([torch.randn(dim, generator=g, device=device) for g in generator])  # (b, dim)


@torch.no_grad()
def generate_image_latents(
    model,
    prompts: torch.Tensor | Sequence[torch.Tensor],
    h: int,
    w: int,
    *,
    num_inference_steps: int = 4,
    method: str = "euler",
    guidance_scale: float = 1.0,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    generator: Generators = None,
    prompt_segments: Sequence[Sequence[Segment]] | None = None,
    uncond_prompt: torch.Tensor | None = None,
    use_cache: bool = True,
    progress: bool = False,
    num_iter: int | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Sample an ``h × w`` grid of (normalized) latents after each prompt: ``(b, h, w, D)`` fp32.

    Causal image attention generates token by token in raster order; bidirectional image attention
    generates by iterative unmasking in ``num_iter`` iterations (default one per 4 tokens, MAR;
    :mod:`ar_model.masked_generation`).

    ``prompts`` as in :func:`~ar_model.generation.generate_image_codes` (``<bos> caption`` rows;
    ``<boi> <h> <w>`` is appended). ``temperature`` scales each token's initial noise;
    ``generator`` is one ``torch.Generator`` or one per prompt (then a prompt's latents do not depend
    on the rows batched with it). ``guidance_scale == 1`` runs no uncond rows (exactly unguided).
    ``guidance_interval=(lo, hi)`` guides only the head's flow steps that start at ``lo ≤ t < hi``
    (:func:`~ar_model.flow_sampler.sample_flow`); the trunk still runs the uncond rows.
    """
    cfg = model.config
    if cfg.latent_dim <= 0 or getattr(model, "diffusion_head", None) is None:
        raise ValueError("this decoder has no diffusion head (latent_dim = 0): use generate_image_codes")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
    interval = check_guidance_interval(guidance_interval)
    steps = num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be an integer ≥ 1, got {steps!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be ≥ 0, got {temperature}")
    rows = _as_rows(prompts)
    if any(r.shape[0] == 0 for r in rows):
        raise ValueError("every prompt needs at least one token (e.g. <bos>)")
    b, hw, dim = len(rows), h * w, cfg.latent_dim
    ids, positions = _image_rows(rows, prompt_segments, h, w, cfg, cfg.rope_scheme)
    guided = guidance_scale != 1.0
    if guided:
        uncond = torch.tensor([cfg.bos_id]) if uncond_prompt is None else torch.as_tensor(uncond_prompt)
        u_ids, u_pos = _image_rows([uncond.to(rows[0].device)] * b, None, h, w, cfg, cfg.rope_scheme)
        ids, positions = ids + u_ids, positions + u_pos
    prompt_pos = [p[: len(t)] for p, t in zip(positions, ids)]
    image_pos = torch.stack([p[len(t) :] for p, t in zip(positions, ids)])  # (rows, h*w, 2)
    batch_ids, batch_pos, mask = left_pad(ids, prompt_pos, cfg.pad_id)
    if batch_ids.shape[1] + hw > cfg.max_position:
        n = batch_ids.shape[1]
        raise ValueError(f"{n} prompt + {hw} image tokens exceed max_position={cfg.max_position}")
    device = batch_ids.device
    if cfg.image_attention == "bidirectional":
        iters = default_num_iter(hw) if num_iter is None else num_iter
        latents = unmask_image_latents(
            model, batch_ids, batch_pos, mask, image_pos, b, num_iter=iters, num_inference_steps=steps,
            method=method, guidance_scale=guidance_scale, cfg_schedule=cfg_schedule,
            temperature=temperature, generator=generator, use_cache=use_cache, progress=progress,
            guidance_interval=interval,
        )  # fmt: skip
        return latents.view(b, h, w, dim)  # (b, h*w, D) -> (b, h, w, D), raster order
    if num_iter is not None:
        raise ValueError("num_iter applies to bidirectional image attention (iterative unmasking) only")
    stepper = _Stepper(model, batch_ids, batch_pos, mask, image_pos, (0, 1), use_cache)
    hidden = stepper.prefill_hidden()  # (rows, c): the condition of latent 0
    head = model.diffusion_head
    sigma = cfg.flow_loss_config.input_noise
    latents = torch.empty(b, hw, dim, device=device)
    placeholder = torch.full((hidden.shape[0],), cfg.latent_token_id, dtype=torch.long, device=device)
    for t in tqdm(range(hw), desc="image tokens", disable=not progress, leave=False):
        noise = _initial_noise(b, dim, generator, device)
        cond = hidden[:b].float()
        scale = guidance_scale_at(guidance_scale, cfg_schedule, t, hw) if guided else 1.0
        x = sample_flow(
            head,
            cond,
            steps,
            method=method,
            temperature=temperature,
            guidance_scale=scale,
            uncond=hidden[b:].float() if guided else None,
            noise=noise,
            guidance_interval=interval,
        )  # (b, D) fp32
        latents[:, t] = x
        if t + 1 == hw:
            break  # the last latent needs no forward pass
        fed = x
        if sigma > 0:  # read the latent as training read its inputs (flow_loss.input_noise)
            fed = x + sigma * _initial_noise(b, dim, generator, device)
        fed = torch.cat([fed, fed]) if guided else fed  # the uncond rows continue with the same latents
        hidden = stepper.step_hidden(placeholder, image_pos[:, t], fed.to(hidden.dtype))
    return latents.view(b, h, w, dim)  # (b, h*w, D) -> (b, h, w, D), raster order
