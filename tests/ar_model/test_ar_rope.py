"""2-D RoPE: bit-for-bit 1-D RoPE on text (against transformers' Llama), axis interleaving, relativity."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from ar_model.positions import multimodal_positions
from ar_model.rope import apply_rope, rope_angles, rope_inv_freq


def _hf(head_dim: int, base: float) -> LlamaRotaryEmbedding:
    cfg = LlamaConfig(
        hidden_size=2 * head_dim,
        num_attention_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": base},
    )
    return LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize("head_dim,base", [(32, 10000.0), (16, 500000.0), (64, 100.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_text_positions_are_bitwise_llama_rope(head_dim: int, base: float, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    b, h, n = 2, 2, 37
    q = torch.randn(b, h, n, head_dim, generator=g).to(dtype)
    k = torch.randn(b, h, n, head_dim, generator=g).to(dtype)
    position_ids = torch.arange(n)[None].expand(b, n)  # (b, n)
    cos_ref, sin_ref = _hf(head_dim, base)(q, position_ids)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)

    pos = multimodal_positions([("text", 10), ("text", n - 10)])[None].expand(b, n, 2)  # (b, n, 2)
    cos, sin = rope_angles(pos, head_dim, base)
    assert cos.dtype == torch.float32
    assert torch.equal(cos.to(dtype), cos_ref) and torch.equal(sin.to(dtype), sin_ref)
    assert torch.equal(apply_rope(q, cos, sin), q_ref) and torch.equal(apply_rope(k, cos, sin), k_ref)
    # (n, d) angles broadcast over batch and heads the same way
    cos1, sin1 = rope_angles(pos[0], head_dim, base)
    assert torch.equal(apply_rope(q, cos1, sin1), q_ref)


def test_half_integer_positions_match_llama_at_the_same_float_position() -> None:
    head_dim, base = 32, 10000.0
    x = torch.randn(1, 2, 6, head_dim)
    p = torch.tensor([0.5, 1.5, 2.0, 7.5, 100.5, 1e4 + 0.5])  # (n,)
    cos_ref, sin_ref = _hf(head_dim, base)(x, p[None])
    cos, sin = rope_angles(torch.stack([p, p], -1), head_dim, base)
    assert torch.equal(cos, cos_ref[0]) and torch.equal(sin, sin_ref[0])


def test_even_pairs_use_axis_0_and_odd_pairs_axis_1() -> None:
    head_dim, base = 16, 10000.0
    pos = torch.tensor([[3.0, 0.0], [0.0, 5.5], [2.5, -4.0]])  # (n, 2): (row/x, col/y)
    cos, sin = rope_angles(pos, head_dim, base, angle_dtype=torch.float64)
    half = head_dim // 2
    for row in range(pos.shape[0]):
        for k in range(half):
            theta = base ** (-2 * k / head_dim)  # DESIGN: theta_k = base^(-2k/d)
            angle = (pos[row, 0] if k % 2 == 0 else pos[row, 1]).item() * theta
            for ch in (k, k + half):  # half-split: pair k is channels (k, k + d/2)
                assert cos[row, ch].item() == pytest.approx(math.cos(angle), abs=1e-12)
                assert sin[row, ch].item() == pytest.approx(math.sin(angle), abs=1e-12)


def test_inv_freq_formula() -> None:
    inv = rope_inv_freq(8, 10000.0, dtype=torch.float64)
    assert inv.tolist() == pytest.approx([10000.0 ** (-2 * k / 8) for k in range(4)], rel=1e-14)
    with pytest.raises(ValueError):
        rope_inv_freq(7)


def _scores(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, angle_dtype: torch.dtype) -> torch.Tensor:
    cos, sin = rope_angles(pos, q.shape[-1], 10000.0, angle_dtype=angle_dtype)
    return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)  # (b, h, n, n)


@pytest.mark.parametrize("angle_dtype,atol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_scores_depend_only_on_per_axis_position_differences(angle_dtype: torch.dtype, atol: float) -> None:
    g = torch.Generator().manual_seed(1)
    n, d = 7, 16
    q = torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
    pos = (torch.randint(-40, 40, (n, 2), generator=g) / 2).double()  # half-integers, axes independent
    base_scores = _scores(q, k, pos, angle_dtype)
    for shift in ([3.5, -7.0], [0.0, 12.5], [-20.0, 0.0]):
        shifted = _scores(q, k, pos + torch.tensor(shift, dtype=torch.float64), angle_dtype)
        torch.testing.assert_close(shifted, base_scores, atol=atol, rtol=0)
    # ... and on both axes: moving one token along a single axis changes its scores.
    for axis in (0, 1):
        moved = pos.clone()
        moved[0, axis] += 1.0
        assert not torch.allclose(_scores(q, k, moved, angle_dtype)[..., 0, 1:], base_scores[..., 0, 1:])


def test_bf16_inputs_keep_dtype_and_float32_angles() -> None:
    x = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    cos, sin = rope_angles(torch.zeros(4, 2) + 1000.5, 8)
    assert cos.dtype == torch.float32  # angles in float32 even for bf16 positions
    assert apply_rope(x, cos, sin).dtype == torch.bfloat16


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        rope_angles(torch.zeros(4, 3), 8)
    cos, sin = rope_angles(torch.zeros(4, 2), 8)
    with pytest.raises(ValueError):
        apply_rope(torch.zeros(1, 1, 4, 16), cos, sin)
