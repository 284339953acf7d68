"""2-D rotary position embeddings over 2-D positions (DESIGN §2).

RoPE (Su et al. 2021, "RoFormer", arXiv:2104.09864) rotates frequency pair ``k`` of a head by
``angle_k = p * theta_k`` with ``theta_k = base^(-2k/d)``. The 2-D variant here interleaves the
two position axes over the pairs: pair ``k`` uses ``p = pos[0]`` (row, x) when ``k`` is even and
``p = pos[1]`` (column, y) when ``k`` is odd. A token at ``(n, n)`` is therefore rotated exactly
like 1-D RoPE at ``n``. Every scheme in :mod:`ar_model.positions` shares this frequency layout, so
schemes differ only in positions.

Pairing convention: half-split, as ``transformers``' Llama ``rotate_half``: pair ``k`` is the
channels ``(k, k + d/2)``. Weights are therefore interchangeable with ``LlamaForCausalLM``.

:func:`apply_rope` is the reference form (``(b, h, n, d)``, bit for bit transformers'). The decoder uses
:func:`rope_tables` once per forward and :func:`rotate` per layer: the same rotation written as
``x * cos + roll(x, d/2) * signed_sin`` with ``signed_sin = (-sin, sin)`` over the two halves, on the
projections' own ``(b, n, h, d)`` layout. That is three elementwise passes instead of six
(``rotate_half`` negates and concatenates), and its backward is the same rotation by ``-angle``.

These are pure functions; a module that caches ``inv_freq`` or cos/sin must keep them as
non-persistent buffers that can be *recomputed*: transformers 5.x builds models on the meta
device inside ``from_pretrained`` and re-creates non-persistent buffers with ``torch.empty_like``
(garbage) before ``_init_weights``, so ``_init_weights`` has to refill them from these functions.
"""

from __future__ import annotations

import torch


def rope_inv_freq(
    head_dim: int,
    base: float = 10000.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``theta_k = base^(-2k/d)`` for ``k = 0..d/2-1``, shape ``(d/2,)``.

    Written as ``1 / base^(2k/d)`` in the same operations as transformers' Llama, so that float32
    angles agree bit for bit.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim))


def rope_angles(
    positions: torch.Tensor,
    head_dim: int,
    base: float = 10000.0,
    *,
    angle_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``(..., n, d)`` for positions ``(..., n, 2)`` (axis 0 = row/x, axis 1 = column/y).

    Angles are computed in ``angle_dtype`` (float32 by default, float64 allowed) whatever the
    model dtype; :func:`apply_rope` casts them to the activations' dtype, as transformers does.
    """
    if positions.shape[-1] != 2:
        raise ValueError(f"positions must have shape (..., n, 2), got {tuple(positions.shape)}")
    inv_freq = rope_inv_freq(head_dim, base, device=positions.device, dtype=angle_dtype)  # (d/2,)
    axis = torch.arange(head_dim // 2, device=positions.device) % 2  # (d/2,): 0 even pairs, 1 odd pairs
    per_pair = positions.to(angle_dtype)[..., axis]  # (..., n, d/2): the coordinate each pair uses
    freqs = per_pair * inv_freq  # (..., n, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., n, d): half-split, pair k = channels (k, k + d/2)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)  # each (..., d/2)
    return torch.cat((-x2, x1), dim=-1)  # (..., d)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(b, h, n, d)`` by cos/sin ``(n, d)`` or ``(b, n, d)`` (broadcast over heads).

    cos/sin are cast to ``x.dtype`` first, so the result matches transformers'
    ``apply_rotary_pos_emb`` bit for bit in every dtype.
    """
    if cos.shape != sin.shape or cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"cos/sin {tuple(cos.shape)} do not match x {tuple(x.shape)} in the last dim")
    if cos.dim() == x.dim() - 1:  # (b, n, d) -> (b, 1, n, d): same rotation for every head
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return (x * cos) + (rotate_half(x) * sin)


def rope_tables(
    positions: torch.Tensor, head_dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables ``cos``, ``signed_sin`` ``(..., n, 1, d)`` for :func:`rotate` from positions ``(..., n, 2)``.

    Angles come from :func:`rope_angles` (float32); ``signed_sin`` is ``sin`` with its first half negated,
    so that ``rotate_half(x) * sin == roll(x, d/2) * signed_sin``. The singleton axis broadcasts over heads.
    """
    cos, sin = rope_angles(positions, head_dim, base)  # each (..., n, d), float32
    half = head_dim // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # (..., n, d)
    return cos.to(dtype).unsqueeze(-2), signed_sin.to(dtype).unsqueeze(-2)  # each (..., n, 1, d)


class _Rotate(torch.autograd.Function):
    """:func:`rotate` with its backward written out: the rotation by ``-angle`` (3 passes, not 4)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, signed_sin)
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # y = x*cos + P(x)*S with P the half swap (P = P^T) and P(S) = -S, so dx = g*cos - P(g)*S.
        cos, signed_sin = ctx.saved_tensors
        return (
            torch.addcmul(grad * cos, grad.roll(grad.shape[-1] // 2, dims=-1), signed_sin, value=-1),
            None,
            None,
        )


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` ``(b, n, h, d)`` with the tables of :func:`rope_tables` ``(b, n, 1, d)``.

    Equal to :func:`apply_rope` on ``x.transpose(1, 2)`` up to rounding (``addcmul`` may fuse the
    multiply-add): ``roll(x, d/2) = (x2, x1)`` and ``(x2, x1) * (-sin, sin) = (-x2, x1) * sin``.
    The tables take no gradient.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotate.apply(x, cos, signed_sin)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)
