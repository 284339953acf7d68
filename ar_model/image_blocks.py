"""Image blocks for bidirectional attention inside a continuous image (DESIGN §2, issue 4).

With ``image_attention="bidirectional"`` the tokens of one image (a run of the continuous placeholder id
inside one document) attend to each other in both directions; everything else stays causal and within
its document. The head then predicts the latents of *masked* image positions (input = the placeholder
embedding) from their own hidden states, as in MAR (Li et al. 2024, arXiv:2406.11838, §3.3 "masked
autoregressive models"); generation unmasks an image iteratively, re-running its block.

* :func:`image_block_ids`: block index per token (-1 outside images);
* :func:`bidirectional_mask`: the boolean attention mask ``base ∨ same-block``;
* :func:`sample_visible_latents`: a MAR-style random mask of the image tokens for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def image_block_ids(
    input_ids: torch.Tensor, image_token_id: int, segments: torch.Tensor | None = None
) -> torch.Tensor:
    """``(b, n)`` long: per row, the index (0, 1, ...) of the image block of each token, -1 elsewhere.

    A block is a maximal run of ``image_token_id`` within one segment (``segments (b, n)``: document or
    chunk index per token, e.g. from ``seq_lens``); images are always separated by their specials, so
    adjacent runs are different images only across a segment boundary.
    """
    is_img = input_ids == image_token_id  # (b, n)
    starts = is_img & ~F.pad(is_img[:, :-1], (1, 0), value=False)  # (b, n): first token of a run
    if segments is not None:
        new_segment = F.pad(segments[:, 1:] != segments[:, :-1], (1, 0), value=True)  # (b, n)
        starts = is_img & (starts | new_segment)
    ids = starts.long().cumsum(dim=1) - 1  # (b, n)
    return torch.where(is_img, ids, torch.full_like(ids, -1))


def bidirectional_mask(
    base: torch.Tensor, query_blocks: torch.Tensor, key_blocks: torch.Tensor
) -> torch.Tensor:
    """``base (b or 1, 1, q, m)`` bool ∨ (query and key in the same image block) → ``(b, 1, q, m)``.

    ``query_blocks (b, q)`` and ``key_blocks (b, m)`` come from :func:`image_block_ids` (keys of cached
    tokens are -1: a block must be fed in one call to see itself whole).
    """
    same = (query_blocks[:, :, None] == key_blocks[:, None, :]) & (query_blocks[:, :, None] >= 0)  # (b, q, m)
    return base | same[:, None]  # (b, 1, q, m)


def sample_visible_latents(
    blocks: torch.Tensor, generator: torch.Generator | None = None, min_ratio: float = 0.0
) -> torch.Tensor:
    """``(b, n)`` bool, true for image tokens that stay visible in a MAR-style training step.

    Each image block draws a masking ratio ``r ~ U(min_ratio, 1)`` and masks each of its tokens with
    probability ``r`` (MAR draws ``r`` from a truncated normal on [0.7, 1]; a per-token coin keeps this a
    few vectorised ops). Pass ``latent_mask = visible`` to the model: masked positions keep the
    placeholder embedding and become the flow targets. Tokens outside images are False.
    """
    b, n = blocks.shape
    num_blocks = int(blocks.max().item()) + 1 if blocks.numel() else 0
    ratios = min_ratio + (1 - min_ratio) * torch.rand(
        b, max(num_blocks, 1), generator=generator, device=blocks.device
    )
    ratio = ratios.gather(1, blocks.clamp(min=0))  # (b, n): the ratio of each token's block
    coin = torch.rand(b, n, generator=generator, device=blocks.device)  # (b, n)
    return (blocks >= 0) & (coin >= ratio)
