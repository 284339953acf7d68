"""Attention kernels for packed rows agree with each other and with a brute-force reference."""

from __future__ import annotations

import warnings

import pytest
import torch

from ar_model.attention import (
    KVCache,
    attend,
    block_causal_mask,
    doc_ids_from_seq_lens,
    padding_causal_mask,
    plan_attention,
    sdpa,
    seq_lens_from_doc_ids,
)

SEQ_LENS = [[5, 3, 3, 1], [12], [4, 4], [7, 3, 2]]  # rows of 12 tokens: padding, equal lengths, a full row
N = 12


def _qkv(h: int = 4, h_kv: int = 2, d: int = 8, seed: int = 0, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    b = len(SEQ_LENS)
    q = torch.randn(b, h, N, d, generator=g)  # (b, h, n, d)
    k = torch.randn(b, h_kv, N, d, generator=g)
    v = torch.randn(b, h_kv, N, d, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _reference(q, k, v, doc_ids):
    """Softmax attention with an explicit loop over queries and the allowed keys."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # (b, h, n, d)
    out = torch.zeros_like(q)
    for r in range(q.shape[0]):
        for i in range(q.shape[2]):
            if doc_ids[r, i] < 0:
                continue
            keys = [j for j in range(i + 1) if doc_ids[r, j] == doc_ids[r, i]]
            kr, vr = k[r][:, keys], v[r][:, keys]  # (h, m, d)
            scores = (q[r, :, i, None, :] @ kr.transpose(-1, -2)) / q.shape[-1] ** 0.5  # (h, 1, m)
            out[r, :, i] = (scores.softmax(-1) @ vr).squeeze(1)  # (h, 1, d) -> (h, d)
    return out


def test_doc_ids_and_seq_lens_round_trip() -> None:
    doc_ids = doc_ids_from_seq_lens(SEQ_LENS, N)
    assert doc_ids[0].tolist() == [0] * 5 + [1] * 3 + [2] * 3 + [3]
    assert doc_ids[2].tolist() == [0] * 4 + [1] * 4 + [-1] * 4
    assert seq_lens_from_doc_ids(doc_ids) == SEQ_LENS


def test_block_causal_mask_matches_its_definition() -> None:
    doc_ids = doc_ids_from_seq_lens(SEQ_LENS, N)
    mask = block_causal_mask(doc_ids)
    assert mask.shape == (len(SEQ_LENS), 1, N, N)
    for r in range(len(SEQ_LENS)):
        for i in range(N):
            for j in range(N):
                same = doc_ids[r, i] >= 0 and doc_ids[r, i] == doc_ids[r, j] and j <= i
                assert bool(mask[r, 0, i, j]) == (same or i == j)


@pytest.mark.parametrize("impl", ["sdpa_per_doc", "sdpa_dense_mask", "flex"])
@pytest.mark.parametrize("h_kv", [4, 2])
def test_packed_attention_matches_reference(impl: str, h_kv: int) -> None:
    q, k, v = _qkv(h_kv=h_kv)
    doc_ids = doc_ids_from_seq_lens(SEQ_LENS, N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it runs unfused (eager) on CPU
        try:
            plan = plan_attention(impl, q.shape[0], N, q.device, doc_ids=doc_ids)
            out = attend(q, k, v, plan)
        except Exception as err:  # pragma: no cover - depends on the torch build
            if impl == "flex":
                pytest.skip(f"flex_attention does not run here: {err}")
            raise
    assert out.shape == q.shape and torch.isfinite(out).all()
    real = (doc_ids >= 0)[:, None, :, None].expand_as(out)  # (b, h, n, d)
    torch.testing.assert_close(out[real], _reference(q, k, v, doc_ids)[real], atol=1e-5, rtol=0)
    if impl == "sdpa_per_doc":
        assert plan.kind == "per_doc"  # (length, count): equal lengths share one SDPA call
        assert plan.groups == [(1, 1), (2, 1), (3, 3), (4, 2), (5, 1), (7, 1), (12, 1)]
        assert (out[~real] == 0).all()  # padding is skipped


def test_per_doc_and_dense_gradients_agree() -> None:
    grads = {}
    doc_ids = doc_ids_from_seq_lens(SEQ_LENS, N)
    real = (doc_ids >= 0)[:, None, :, None].float()  # (b, 1, n, 1): loss on real tokens only
    weight = torch.randn(len(SEQ_LENS), 4, N, 8, generator=torch.Generator().manual_seed(3))
    for impl in ("sdpa_per_doc", "sdpa_dense_mask"):
        q, k, v = _qkv(grad=True)
        plan = plan_attention(impl, q.shape[0], N, q.device, seq_lens=SEQ_LENS)
        (attend(q, k, v, plan) * weight * real).sum().backward()
        grads[impl] = [t.grad for t in (q, k, v)]
    for a, b in zip(grads["sdpa_per_doc"], grads["sdpa_dense_mask"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_one_full_document_per_row_is_plain_causal() -> None:
    plan = plan_attention("sdpa_per_doc", 2, N, torch.device("cpu"), seq_lens=[[N], [N]])
    assert plan.kind == "causal"
    assert plan_attention("sdpa_per_doc", 2, N, torch.device("cpu")).kind == "causal"


def test_padding_mask_keeps_padded_queries_finite() -> None:
    key_mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    mask = padding_causal_mask(key_mask, 5)  # (b, 1, q, m)
    assert mask[0, 0, 0].tolist() == [True, False, False, False, False]  # a padded query sees itself
    assert mask[0, 0, 4].tolist() == [False, False, True, True, True]
    q = torch.randn(2, 2, 5, 4)
    assert torch.isfinite(sdpa(q, q, q, mask=mask)).all()
    assert padding_causal_mask(key_mask, 1)[0, 0, 0].tolist() == [False, False, True, True, True]


def test_kv_cache_grows_and_keeps_its_contents() -> None:
    cache = KVCache(num_layers=2, batch=1, num_kv_heads=2, head_dim=4, capacity=2)
    seen = []
    for step in range(5):
        k = torch.full((1, 2, 1, 4), float(step))
        for layer in range(2):
            keys, values = cache.update(layer, k, -k)
            assert keys.shape == (1, 2, step + 1, 4)
        cache.advance(1)
        seen.append(step)
    assert cache.length == cache.get_seq_length() == 5 and cache.keys[1].shape[2] >= 5
    assert keys[0, 0, :, 0].tolist() == [float(s) for s in seen] and torch.equal(values, -keys)


def test_packed_rows_reject_cache_and_padding_masks() -> None:
    with pytest.raises(ValueError, match="cannot be combined"):
        plan_attention("sdpa_per_doc", 1, 4, torch.device("cpu"), seq_lens=[[4]], cached=True)
    with pytest.raises(ValueError, match="attention_mask"):
        plan_attention(
            "sdpa_per_doc", 1, 4, torch.device("cpu"), attention_mask=torch.ones(1, 5, dtype=torch.bool)
        )
