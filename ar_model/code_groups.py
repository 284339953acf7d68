"""Grouped image codes: ``g × g`` neighbouring codes share one decoder position (fewer, richer tokens).

A tokenizer's ``(H, W)`` code grid becomes an ``(H/g, W/g)`` grid of positions, each holding the
``G = g²`` codes of its ``g × g`` block (raster order inside the block). The trunk then runs
``G`` times fewer image tokens, the cost that dominates a shapes document (64 of its ~77 tokens at
8×8 codes); the tokenizer, and so the reconstruction quality, is unchanged.

* **Input:** a position's embedding is the sum of its ``G`` codes' embeddings, one table per slot
  (``MMDecoderModel.group_embed``, ``G·K`` rows for a codebook of ``K``).
* **Output:** :class:`CodeGroupHead` factorises ``p(c_1 … c_G | h) = Π_s p(c_s | h, c_<s)``. Slot ``s``
  reads ``h`` (the trunk's hidden state before the position) plus the embeddings of the codes already
  drawn in the block plus a slot embedding, through one residual MLP, into logits over the codebook.
  This is the depth-wise factorisation of RQ-Transformer (Lee et al. 2022, arXiv:2203.01941, §3.2),
  with an MLP in place of its depth transformer: training runs every slot in parallel (teacher
  forcing), sampling runs the slots one after the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CodeGroupHead", "group_codes", "ungroup_codes"]


def group_codes(codes: torch.Tensor, g: int) -> torch.Tensor:
    """``(..., H, W)`` codes -> ``(..., H/g, W/g, g*g)``: each position's ``g × g`` block, raster order."""
    h, w = codes.shape[-2:]
    if g < 1 or h % g or w % g:
        raise ValueError(f"a {h}x{w} code grid does not split into {g}x{g} groups")
    lead = codes.shape[:-2]
    x = codes.reshape(*lead, h // g, g, w // g, g)  # (..., H/g, g, W/g, g)
    x = x.transpose(-3, -2)  # (..., H/g, W/g, g, g)
    return x.reshape(*lead, h // g, w // g, g * g)  # (..., H/g, W/g, g*g)


def ungroup_codes(groups: torch.Tensor, g: int) -> torch.Tensor:
    """Inverse of :func:`group_codes`: ``(..., h, w, g*g)`` -> ``(..., h*g, w*g)``."""
    h, w, gg = groups.shape[-3:]
    if gg != g * g:
        raise ValueError(f"groups of {gg} codes are not {g}x{g} blocks")
    lead = groups.shape[:-3]
    x = groups.reshape(*lead, h, w, g, g)  # (..., h, w, g, g)
    x = x.transpose(-3, -2)  # (..., h, g, w, g)
    return x.reshape(*lead, h * g, w * g)  # (..., h*g, w*g)


class CodeGroupHead(nn.Module):
    """Logits of the ``group`` codes of one position from the trunk's hidden state (module docstring).

    Args:
        hidden_size: width of the trunk's hidden state (and of the head).
        num_codes: codebook size ``K``.
        group: codes per position ``G``.
        width: hidden width of the residual MLP.
        eps: RMSNorm epsilon.
    """

    def __init__(self, hidden_size: int, num_codes: int, group: int, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_codes, self.group = num_codes, group
        self.prev_embed = nn.Embedding(group * num_codes, hidden_size)  # code c of slot s at row s·K + c
        self.slot_embed = nn.Embedding(group, hidden_size)
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.fc1 = nn.Linear(hidden_size, width)
        self.fc2 = nn.Linear(width, hidden_size)
        self.out_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.out = nn.Linear(hidden_size, num_codes, bias=False)

    def _logits(self, u: torch.Tensor) -> torch.Tensor:
        """``u (..., c)`` (condition + context + slot) -> logits ``(..., K)``."""
        u = u + self.fc2(F.gelu(self.fc1(self.norm(u)), approximate="tanh"))
        return self.out(self.out_norm(u))

    def _prev(self, codes: torch.Tensor, slot: int | torch.Tensor) -> torch.Tensor:
        return self.prev_embed(codes + slot * self.num_codes)

    def forward(self, cond: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(N, G, K)`` of ``codes (N, G)`` given ``cond (N, c)``."""
        slots = torch.arange(self.group, device=codes.device)
        prev = self._prev(codes, slots)  # (N, G, c)
        context = prev.cumsum(1) - prev  # (N, G, c): slot s sees the codes of slots < s
        u = cond[:, None, :] + context + self.slot_embed.weight  # (N, G, c)
        return self._logits(u)  # (N, G, K)

    def loss(self, cond: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy (fp32) over the ``N · G`` codes (the caller divides by its count)."""
        logits = self(cond, codes)  # (N, G, K)
        return F.cross_entropy(logits.float().flatten(0, 1), codes.flatten(), reduction="sum")

    def slot_logits(self, cond: torch.Tensor, context: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits ``(N, K)`` of slot ``slot`` given ``cond (N, c)`` and ``context (N, c)``, the summed
        :meth:`code_embedding` of the codes drawn for slots ``< slot`` (zeros for slot 0)."""
        return self._logits(cond + context + self.slot_embed.weight[slot])

    def code_embedding(self, codes: torch.Tensor, slot: int) -> torch.Tensor:
        """``(N,)`` codes drawn for ``slot`` -> their ``(N, c)`` context embedding for later slots."""
        return self._prev(codes, slot)
