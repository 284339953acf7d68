"""Iterative unmasking for bidirectional image attention (MAR-style generation of continuous tokens).

A decoder trained with ``image_attention="bidirectional"`` sees an image block whole: its masked
positions carry the placeholder embedding, its known positions their latents, and the diffusion head
predicts a masked position's latent from that position's own hidden state (training:
:func:`ar_model.train.visible_latents`). Generation follows MAR (Li et al. 2024, arXiv:2406.11838,
§3.3 and its sampler): all ``h·w`` positions start masked; each of ``num_iter`` iterations runs the
whole block through the decoder (after the prompt, which is cached once), then samples the next
positions of a random order with the head, so that after iteration ``k`` the number still masked is
``⌊N·cos(π/2 · (k+1)/K)⌋`` (MAR's cosine schedule; at least one position is revealed per iteration, and
the last iteration reveals the rest).

Classifier-free guidance runs uncond rows (the empty caption) beside the cond rows through the trunk
in the same batch, with the same known latents, and guides the head's velocity; the ``"linear"``
schedule ramps the scale with the fraction of revealed tokens, as MAR does.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ar_model.attention import KVCache
from ar_model.flow_sampler import sample_flow
from ar_model.generation import Generators, guidance_scale_at

__all__ = ["default_num_iter", "reveal_counts", "unmask_image_latents"]


def default_num_iter(num_tokens: int) -> int:
    """MAR's ratio: 64 iterations for 256 tokens, i.e. one per 4 tokens (at least 1)."""
    return max(1, num_tokens // 4)


def reveal_counts(num_tokens: int, num_iter: int) -> list[int]:
    """Positions revealed at each iteration: the cosine schedule, ≥ 1 per iteration, summing to N."""
    if num_iter < 1 or num_iter > num_tokens:
        raise ValueError(
            f"num_iter must be in [1, {num_tokens}] for {num_tokens} image tokens, got {num_iter}"
        )
    counts, revealed = [], 0
    for k in range(num_iter):
        still_masked = math.floor(num_tokens * math.cos(math.pi / 2 * (k + 1) / num_iter))
        # Leave at least one position for each later iteration, and reveal at least one now.
        still_masked = min(still_masked, num_tokens - revealed - 1)
        still_masked = max(still_masked, num_iter - k - 1)
        counts.append(num_tokens - revealed - still_masked)
        revealed = num_tokens - still_masked
    return counts


def _per_row(generator: Generators, b: int, fn) -> list:
    """``fn(g)`` for each of ``b`` rows: row ``i`` uses generator ``i`` (a list) or the shared one."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != b:
            raise ValueError(f"got {len(generator)} generators for {b} rows")
        return [fn(g) for g in generator]
    return [fn(generator) for _ in range(b)]


@torch.no_grad()
def unmask_image_latents(
    model,
    batch_ids: torch.Tensor,
    batch_pos: torch.Tensor,
    mask: torch.Tensor,
    image_pos: torch.Tensor,
    b: int,
    *,
    num_iter: int,
    num_inference_steps: int,
    method: str,
    guidance_scale: float,
    cfg_schedule: str,
    temperature: float,
    generator: Generators,
    use_cache: bool = True,
    progress: bool = False,
    guidance_interval: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Latents ``(b, h·w, D)`` (normalized) for left-padded prompts ending in ``<boi> <h> <w>``.

    ``batch_ids, batch_pos, mask (rows, n[, 2])``: the prompts (rows = b, or 2b with the uncond rows
    after the cond rows when guided); ``image_pos (rows, h·w, 2)``: the image positions. Without a
    cache every iteration reruns prompt + block (the reference the tests compare with).
    """
    cfg = model.config
    decoder, head = model.model, model.diffusion_head
    rows, n = batch_ids.shape
    hw, dim = image_pos.shape[1], cfg.latent_dim
    guided = rows != b
    device = batch_ids.device
    padded = not bool(mask.all())
    key_mask = torch.cat([mask, mask.new_ones(rows, hw)], dim=1) if padded else None  # (rows, n + hw)
    block_ids = torch.full((rows, hw), cfg.latent_token_id, dtype=torch.long, device=device)
    cache = None
    if use_cache:
        w = decoder.embed_tokens.weight
        cache = KVCache(
            cfg.num_layers, rows, cfg.num_kv_heads, cfg.head_dim, n + hw, dtype=w.dtype, device=w.device
        )
        decoder(
            batch_ids, positions=batch_pos, attention_mask=mask if padded else None, past_key_values=cache
        )

    # Per row: a random order of the positions, and the noise of every position (batch invariant).
    order = torch.stack(
        _per_row(generator, b, lambda g: torch.randperm(hw, generator=g, device=device))
    )  # (b, hw)
    noise = torch.stack(
        _per_row(generator, b, lambda g: torch.randn(hw, dim, generator=g, device=device))
    )  # (b, hw, D), indexed by order step
    sigma = cfg.flow_loss_config.input_noise
    if sigma > 0:  # the known latents are read as training read its inputs (flow_loss.input_noise)
        read_noise = sigma * torch.stack(
            _per_row(generator, b, lambda g: torch.randn(hw, dim, generator=g, device=device))
        )  # (b, hw, D)
    latents = torch.zeros(b, hw, dim, device=device)
    known = torch.zeros(b, hw, dtype=torch.bool, device=device)
    revealed = 0
    for count in tqdm(reveal_counts(hw, num_iter), desc="unmasking", disable=not progress, leave=False):
        read = latents + read_noise if sigma > 0 else latents  # (b, hw, D)
        lat_in = torch.cat([read, read]) if guided else read  # (rows, hw, D)
        known_in = torch.cat([known, known]) if guided else known  # (rows, hw)
        if use_cache:
            out = decoder(
                block_ids, positions=image_pos, attention_mask=key_mask, past_key_values=cache,
                latents=lat_in, latent_mask=known_in,
            )  # fmt: skip
            cache.truncate(n)  # roll back: the block is rerun whole next iteration
            hidden = out.last_hidden_state  # (rows, hw, c)
        else:
            pad_lat = torch.zeros(rows, n, dim, device=device)
            out = decoder(
                torch.cat([batch_ids, block_ids], dim=1),
                positions=torch.cat([batch_pos, image_pos.to(batch_pos)], dim=1),
                attention_mask=key_mask,
                latents=torch.cat([pad_lat, lat_in], dim=1),
                latent_mask=torch.cat([torch.zeros_like(mask), known_in], dim=1),
            )
            hidden = out.last_hidden_state[:, n:]  # (rows, n + hw, c) -> (rows, hw, c)
        pick = order[:, revealed : revealed + count]  # (b, m): the positions revealed now
        c = hidden.shape[-1]
        idx = pick[..., None].expand(-1, -1, c)  # (b, m, c)
        cond = hidden[:b].gather(1, idx).reshape(b * count, c).float()  # (b, m, c) -> (b*m, c)
        uncond = hidden[b:].gather(1, idx).reshape(b * count, c).float() if guided else None
        scale = guidance_scale_at(guidance_scale, cfg_schedule, revealed + count - 1, hw) if guided else 1.0
        x = sample_flow(
            head,
            cond,
            num_inference_steps,
            method=method,
            temperature=temperature,
            guidance_scale=scale,
            uncond=uncond,
            noise=noise[:, revealed : revealed + count].reshape(b * count, dim),  # (b, m, D) -> (b*m, D)
            guidance_interval=guidance_interval,
        )  # (b*m, D) fp32
        latents.scatter_(1, pick[..., None].expand(-1, -1, dim), x.view(b, count, dim))  # (b, hw, D)
        known.scatter_(1, pick, True)
        revealed += count
    return latents
