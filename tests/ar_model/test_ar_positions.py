"""Multimodal positions: the DESIGN §2 formulas, token for token, and mrope against Qwen2-VL's own rule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ar_model.positions import SCHEMES, document_positions, multimodal_positions, num_tokens


def _reference(segments: list, scheme: str) -> list[tuple[float, float]]:
    """Per-token loop, written straight from DESIGN §2 (slow but literal)."""
    out: list[tuple[float, float]] = []
    nxt = 0  # position of the next text token; the previous token is at L = nxt - 1
    for kind, size in segments:
        if kind == "text":
            for _ in range(size):
                out.append((nxt, nxt))
                nxt += 1
            continue
        h, w = size
        L = nxt - 1
        if scheme == "rope_tv":
            for i in range(1, h + 1):
                for j in range(1, w + 1):
                    out.append((L + (w * h - h) / 2 + i, L + (w * h - w) / 2 + j))
            nxt = L + w * h + 1
        elif scheme == "mrope":
            for i in range(h):
                for j in range(w):
                    out.append((L + 1 + i, L + 1 + j))
            nxt = max(max(p) for p in out) + 1
        else:
            for _ in range(h * w):
                out.append((nxt, nxt))
                nxt += 1
    return out


segment_st = st.one_of(
    st.tuples(st.just("text"), st.integers(0, 5)),
    st.tuples(st.just("image"), st.tuples(st.integers(1, 4), st.integers(1, 4))),
)


def test_rope_tv_worked_example() -> None:
    # 3 text tokens (L = 2), a 2x3 image (w*h = 6), 2 text tokens.
    pos = multimodal_positions([("text", 3), ("image", (2, 3)), ("text", 2)], "rope_tv")
    # row i: L + (6-2)/2 + i = 4 + i; column j: L + (6-3)/2 + j = 3.5 + j
    rows = [(5.0, 4.5), (5.0, 5.5), (5.0, 6.5), (6.0, 4.5), (6.0, 5.5), (6.0, 6.5)]
    expected = [(0, 0), (1, 1), (2, 2), *rows, (9, 9), (10, 10)]  # next text at L + w*h + 1 = 9
    assert pos.dtype == torch.float32
    assert pos.tolist() == [list(map(float, p)) for p in expected]


def test_rope_tv_image_first_treats_L_as_minus_one() -> None:
    pos = multimodal_positions([("image", (1, 2)), ("text", 1)], "rope_tv")
    # L = -1: row -1 + (2-1)/2 + 1 = 0.5, cols -1 + 0 + j = 0, 1; next text at -1 + 2 + 1 = 2.
    assert pos.tolist() == [[0.5, 0.0], [0.5, 1.0], [2.0, 2.0]]


def test_mrope_and_flat_worked_examples() -> None:
    segs = [("text", 2), ("image", (2, 3)), ("text", 1)]
    mrope = multimodal_positions(segs, "mrope")
    assert mrope.tolist() == [[0, 0], [1, 1], [2, 2], [2, 3], [2, 4], [3, 2], [3, 3], [3, 4], [5, 5]]
    flat = multimodal_positions(segs, "flat")
    assert flat.tolist() == [[k, k] for k in range(9)]


@settings(max_examples=60, deadline=None)
@given(st.lists(segment_st, max_size=6), st.sampled_from(SCHEMES))
def test_matches_literal_formula(segments: list, scheme: str) -> None:
    pos = multimodal_positions(segments, scheme)
    assert pos.shape == (num_tokens(segments), 2)
    assert pos.tolist() == [list(map(float, p)) for p in _reference(segments, scheme)]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 6), st.integers(1, 6), st.integers(1, 6))
def test_rope_tv_image_is_centred_on_its_slots(before: int, h: int, w: int) -> None:
    pos = multimodal_positions([("text", before), ("image", (h, w))], "rope_tv")[before:].double()
    slots_mean = before + (h * w - 1) / 2  # mean of the 1-D positions L+1 .. L+w*h
    assert pos[:, 0].mean().item() == pytest.approx(slots_mean)
    assert pos[:, 1].mean().item() == pytest.approx(slots_mean)
    # spacing 1 along each axis whatever the size: rows differ by 1 between raster rows, cols within a row
    grid = pos.reshape(h, w, 2)  # (h*w, 2) -> (h, w, 2), raster order
    assert torch.all(grid[1:, :, 0] - grid[:-1, :, 0] == 1)
    assert torch.all(grid[:, 1:, 1] - grid[:, :-1, 1] == 1)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_text_only_is_1d(scheme: str) -> None:
    pos = multimodal_positions([("text", 4), ("text", 0), ("text", 3)], scheme)
    assert torch.equal(pos, torch.arange(7.0)[:, None].expand(7, 2))


def test_large_image_and_dtype_device() -> None:
    pos = multimodal_positions([("text", 5), ("image", (64, 64))], dtype=torch.float64, device="cpu")
    assert pos.shape == (5 + 4096, 2) and pos.dtype == torch.float64
    assert multimodal_positions([]).shape == (0, 2)


def test_document_positions_restart() -> None:
    docs = [[("text", 2), ("image", (1, 2))], [("text", 3)]]
    pos = document_positions(docs, "mrope")
    assert torch.equal(pos[4:], torch.arange(3.0)[:, None].expand(3, 2))
    assert torch.equal(pos[:4], multimodal_positions(docs[0], "mrope"))


@pytest.mark.parametrize(
    "bad",
    [[("video", 3)], [("text", -1)], [("image", (0, 2))], [("image", 4)], [("text", 1.5)], [("text",)]],
)
def test_bad_segments(bad: list) -> None:
    with pytest.raises(ValueError):
        multimodal_positions(bad)


def test_bad_scheme() -> None:
    with pytest.raises(ValueError, match="scheme"):
        multimodal_positions([("text", 1)], "alibi")


# --- mrope against Qwen2-VL --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2vl():
    """A tiny Qwen2-VL model (random weights, built offline) whose ``get_rope_index`` is the reference."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2VLConfig(
        vision_config=dict(
            depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=1, spatial_merge_size=1
        ),
        text_config=dict(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=32,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
        ),
        image_token_id=30,
        video_token_id=31,
        vision_start_token_id=29,
    )
    return transformers.Qwen2VLModel(cfg).eval()


def _qwen_positions(model, segments: list) -> torch.Tensor:
    """Qwen2-VL's (t, h, w) position ids ``(3, n)`` for the same segments (single-frame images)."""
    types = []
    grids = []
    for kind, size in segments:
        if kind == "text":
            types += [0] * size
        else:
            types += [1] * (size[0] * size[1])
            grids.append([1, size[0], size[1]])
    ids = torch.where(torch.tensor(types) == 1, 30, 5)[None]  # (1, n)
    pos, _ = model.get_rope_index(ids, torch.tensor([types]), image_grid_thw=torch.tensor(grids))
    return pos[:, 0]  # (3, 1, n) -> (3, n)


QWEN_LAYOUTS = [
    [("text", 3), ("image", (2, 3)), ("text", 2)],
    [("image", (3, 2)), ("text", 4)],  # image first: Qwen starts at 0, like our L = -1
    [("text", 1), ("image", (1, 1)), ("text", 1), ("image", (4, 2)), ("text", 3)],
    [("text", 5), ("image", (2, 2))],  # image last
    [("text", 2), ("image", (1, 5)), ("text", 1), ("image", (5, 1)), ("text", 1)],
]


@pytest.mark.parametrize("segments", QWEN_LAYOUTS)
def test_mrope_equals_qwen2vl_get_rope_index(qwen2vl, segments: list) -> None:
    ours = multimodal_positions(segments, "mrope")  # (n, 2): (row, col)
    t, h, w = _qwen_positions(qwen2vl, segments).double()  # each (n,)
    assert torch.equal(ours[:, 0].double(), h)  # our row axis = Qwen's height ids
    assert torch.equal(ours[:, 1].double(), w)  # our column axis = Qwen's width ids
    is_text = torch.tensor(
        [k == "text" for k, s in segments for _ in range(s if k == "text" else s[0] * s[1])]
    )
    assert torch.equal(ours[is_text, 0].double(), t[is_text])  # text: t = h = w, continuing after images


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)), min_size=1, max_size=3))
def test_mrope_equals_qwen2vl_random(qwen2vl, images: list) -> None:
    # Qwen groups runs of one modality, so images are separated by at least one text token.
    segments: list = []
    for before, h, w in images:
        segments += [("text", before), ("image", (h, w))]
    segments.append(("text", 2))
    ours = multimodal_positions(segments, "mrope")
    _, h, w = _qwen_positions(qwen2vl, segments).double()
    assert torch.equal(ours.double(), torch.stack([h, w], dim=-1))
