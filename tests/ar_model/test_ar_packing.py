"""Packing: best-fit decreasing plans, no lost or mixed tokens, padding only at row ends, exact unpacking."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ar_model.packing import (
    IGNORE_INDEX,
    build_packed_batch,
    build_padded_batch,
    join_rows,
    pack_documents,
    unpack_batch,
)


def _doc(i: int, n: int) -> dict[str, torch.Tensor]:
    """A synthetic document: unique ids, positions from 0, next-token labels with -100 at the end."""
    ids = 1000 * (i + 1) + torch.arange(n)  # (n,)
    labels = torch.cat([ids[1:], torch.tensor([IGNORE_INDEX])])[:n]  # (n,)
    pos = torch.arange(n, dtype=torch.float32)[:, None].expand(n, 2) + torch.tensor([0.0, 0.5])  # (n, 2)
    return {"input_ids": ids, "positions": pos, "labels": labels, "modality": torch.arange(n) % 2}


def test_best_fit_decreasing_worked_example() -> None:
    plan = pack_documents([5, 3, 8, 2, 6], max_len=8)
    # 8 fills row 0; 6 opens row 1 (2 left); 5 opens row 2 (3 left); 3 fits row 2 exactly; 2 fits row 1.
    assert plan.rows == [[(2, 0, 8)], [(4, 0, 6), (3, 0, 2)], [(0, 0, 5), (1, 0, 3)]]
    assert plan.useful_fraction == 1.0 and plan.num_split == plan.num_dropped == 0


def test_best_fit_picks_the_tightest_row() -> None:
    # after 7 | 5+4 the rows have 3 and 1 left: the 1 goes to the tighter second row (first-fit would
    # pick the first row).
    plan = pack_documents([5, 4, 7, 1], max_len=10)
    assert plan.rows == [[(2, 0, 7)], [(0, 0, 5), (1, 0, 4), (3, 0, 1)]]


def test_split_and_drop_policies() -> None:
    split = pack_documents([20, 3], max_len=8, policy="split")
    assert split.num_split == 1 and split.num_dropped == 0
    assert split.rows == [[(0, 0, 8)], [(0, 8, 16)], [(0, 16, 20), (1, 0, 3)]]
    drop = pack_documents([20, 3], max_len=8, policy="drop")
    assert drop.num_dropped == 1 and drop.rows == [[(1, 0, 3)]]
    with pytest.raises(ValueError):
        pack_documents([3], max_len=8, policy="truncate")
    with pytest.raises(ValueError):
        pack_documents([-1], max_len=8)
    with pytest.raises(ValueError):
        pack_documents([1], max_len=0)


def test_split_document_chunks_keep_positions_and_labels() -> None:
    docs = [_doc(0, 11)]
    batch = build_packed_batch(docs, pack_documents([11], max_len=4), 4, pad_id=0)
    back = unpack_batch(batch)[0]
    for key in docs[0]:
        assert torch.equal(back[key], docs[0][key])
    assert batch["positions"][1, 0, 0].item() == 4.0  # the second chunk continues the document's positions


length_lists = st.lists(st.integers(0, 40), max_size=12)


@settings(max_examples=80, deadline=None)
@given(length_lists, st.integers(1, 32), st.sampled_from(["split", "drop"]))
def test_pack_invariants(lengths: list[int], max_len: int, policy: str) -> None:
    docs = [_doc(i, n) for i, n in enumerate(lengths)]
    plan = pack_documents(lengths, max_len, policy)
    batch = build_packed_batch(docs, plan, max_len, pad_id=7)
    kept = {i for i, n in enumerate(lengths) if n > 0 and (n <= max_len or policy == "split")}
    assert plan.num_dropped == sum(n > max_len for n in lengths) * (policy == "drop")
    assert plan.num_split == sum(n > max_len for n in lengths) * (policy == "split")

    # every row holds at most max_len tokens; no token is lost (pieces tile each kept document)
    covered: dict[int, list[tuple[int, int]]] = {}
    for row in plan.rows:
        assert sum(e - s for _, s, e in row) <= max_len
        for d, s, e in row:
            covered.setdefault(d, []).append((s, e))
    assert set(covered) == kept
    for d, spans in covered.items():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == lengths[d]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    # a document of exactly max_len occupies one row by itself
    for d, n in enumerate(lengths):
        if n == max_len:
            assert [(d, 0, n)] in plan.rows

    ids = batch.doc_ids
    assert ids.shape == (plan.num_rows, max_len)
    for r in range(plan.num_rows):
        row = ids[r].tolist()
        real = sum(x >= 0 for x in row)
        assert all(x >= 0 for x in row[:real]) and all(x == -1 for x in row[real:])  # padding only at the end
        runs = [x for i, x in enumerate(row[:real]) if i == 0 or row[i - 1] != x]
        assert len(runs) == len(set(runs))  # each document is one contiguous run: never mixed
        assert [sum(1 for x in row if x == d) for d in runs] == batch.seq_lens[r]
        assert batch.cu_seqlens[r].tolist() == [sum(batch.seq_lens[r][:i]) for i in range(len(runs) + 1)]
        pad = slice(real, max_len)
        assert torch.all(batch["input_ids"][r, pad] == 7)
        assert torch.all(batch["labels"][r, pad] == IGNORE_INDEX)
        assert torch.all(batch["positions"][r, pad] == 0)

    # unpacking gives back the documents exactly
    back = unpack_batch(batch)
    assert set(back) == kept
    for d in kept:
        for key, value in docs[d].items():
            assert torch.equal(back[d][key], value), key
    total = sum(lengths[d] for d in kept)
    assert plan.num_tokens == total
    assert plan.useful_fraction == (total / (plan.num_rows * max_len) if plan.rows else 1.0)


@settings(max_examples=60, deadline=None)
@given(length_lists, st.integers(4, 32), st.integers(0, 3))
def test_joined_rows_hold_the_same_documents_without_padding(
    lengths: list[int], max_len: int, extra: int
) -> None:
    docs = [_doc(i, n) for i, n in enumerate(lengths)]
    batch = build_packed_batch(docs, pack_documents(lengths, max_len, "split"), max_len, pad_id=7)
    limit = max_len + extra * max_len // 2  # from one row per joined row to several
    joined = join_rows(batch, limit, pad_id=7)
    sizes = [sum(lens) for lens in batch.seq_lens]
    # the same documents in the same order, rows whole and in order, each joined row within the limit
    assert [n for lens in joined.seq_lens for n in lens] == [n for lens in batch.seq_lens for n in lens]
    assert all(sum(lens) <= limit for lens in joined.seq_lens)
    assert sum(sum(lens) for lens in joined.seq_lens) == sum(sizes)
    back, orig = unpack_batch(joined), unpack_batch(batch)
    assert back.keys() == orig.keys()
    for d in orig:
        for key in orig[d]:
            assert torch.equal(back[d][key], orig[d][key]), key
    for r, lens in enumerate(joined.seq_lens):  # padding only at the end of a joined row, with pad values
        real = sum(lens)
        assert torch.all(joined.doc_ids[r, :real] >= 0) and torch.all(joined.doc_ids[r, real:] == -1)
        assert torch.all(joined["input_ids"][r, real:] == 7) and torch.all(
            joined["labels"][r, real:] == IGNORE_INDEX
        )
        assert joined.cu_seqlens[r].tolist() == [sum(lens[:i]) for i in range(len(lens) + 1)]
    if batch.num_rows and limit >= sum(sizes):
        assert joined.num_rows == 1 and joined.useful_fraction == 1.0
    if max(sizes, default=0) > 1:  # a row longer than the limit is refused
        with pytest.raises(ValueError, match="limit"):
            join_rows(batch, max(sizes) - 1)


def test_padded_baseline() -> None:
    docs = [_doc(0, 5), _doc(1, 2), _doc(2, 3)]
    batch = build_padded_batch(docs, pad_id=0)
    assert batch["input_ids"].shape == (3, 5) and batch["positions"].shape == (3, 5, 2)
    assert batch.doc_ids.tolist() == [[0] * 5, [1, 1, -1, -1, -1], [2, 2, 2, -1, -1]]
    assert batch.useful_fraction == pytest.approx(10 / 15)
    assert torch.all(batch["labels"][1, 2:] == IGNORE_INDEX)
    back = unpack_batch(batch)
    assert all(torch.equal(back[i]["input_ids"], d["input_ids"]) for i, d in enumerate(docs))
    packed = build_packed_batch(docs, pack_documents([5, 2, 3], max_len=5))
    assert packed.useful_fraction == 1.0 > batch.useful_fraction


def test_batch_errors() -> None:
    docs = [_doc(0, 4)]
    with pytest.raises(ValueError, match="lengths"):
        build_packed_batch(docs, pack_documents([5], max_len=8))
    with pytest.raises(ValueError, match="max_len"):
        build_packed_batch(docs, pack_documents([4], max_len=8), max_len=16)
    bad = [{**_doc(0, 4), "latents": torch.zeros(2, 3)}]
    with pytest.raises(ValueError, match="per-token"):
        build_packed_batch(bad, pack_documents([4], max_len=8))
