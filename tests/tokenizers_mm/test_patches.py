"""Raw patches: patchify/unpatchify are exact inverses with a fixed (row, col, channel) layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizers_mm.patches import RawPatches, patchify, unpatchify


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    c=st.sampled_from([1, 3]),
    gh=st.integers(1, 4),
    gw=st.integers(1, 4),
    p=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_exact_inverses(b, c, gh, gw, p, seed):
    x = torch.randn(b, c, gh * p, gw * p, generator=torch.Generator().manual_seed(seed))
    tokens = patchify(x, p)
    assert tokens.shape == (b, gh, gw, p * p * c)
    assert torch.equal(unpatchify(tokens, p), x)
    assert torch.equal(patchify(unpatchify(tokens, p), p), tokens)


def test_token_layout_is_row_col_channel():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = patchify(x, 2)
    i, j = 1, 2  # token row 1, column 2 of image 1
    patch = x[1, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]  # (c, p, p)
    assert torch.equal(tokens[1, i, j], patch.permute(1, 2, 0).reshape(-1))


def test_non_multiple_names_the_multiple():
    with pytest.raises(ValueError, match="multiples of 4"):
        patchify(torch.zeros(1, 3, 30, 32), 4)
    with pytest.raises(ValueError, match="multiple of p\\*p = 16"):
        unpatchify(torch.zeros(1, 2, 2, 40), 4)


def test_raw_patches_bottleneck_is_identity_with_gradients():
    rp = RawPatches(4)
    assert rp.token_dim == 48
    x = torch.randn(2, 3, 16, 8, requires_grad=True)
    tokens = rp.encode(x)
    out = rp(tokens)
    assert out.indices is None and out.loss.item() == 0.0 and out.quantized is tokens
    rp.decode(out.quantized).square().sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())
    with pytest.raises(ValueError, match=r"\(\.\.\., 48\)"):
        rp(torch.zeros(1, 2, 2, 12))
