"""Interleaved sequence builder: exact layout, positions, labels, offsets, both orders, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ar_model.packing import IGNORE_INDEX, build_packed_batch, pack_documents, unpack_batch
from ar_model.positions import SCHEMES, multimodal_positions
from ar_model.sequence import build_sequence, image_to_text_document, text_to_image_document
from ar_model.text_tokenizer import TextTokenizer

N = 16  # the shared fixture's max_image_side


def _codes(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (h, w), generator=torch.Generator().manual_seed(seed))


def test_caption_to_image_layout_every_id(text_tokenizer: TextTokenizer) -> None:
    tok = text_tokenizer
    codes = torch.tensor([[0, 1, 2], [61, 62, 63]])  # (h=2, w=3)
    seq = build_sequence(text_to_image_document("a red circle", codes), tok, code_offset=1000)
    cap = tok.encode("a red circle")
    h_id, w_id = 6 + 1, 6 + N + 2  # <h_2>, <w_3>
    expected = [1, *cap, 4, h_id, w_id, 1000, 1001, 1002, 1061, 1062, 1063, 5, 2]
    assert seq.input_ids.tolist() == expected and seq.input_ids.dtype == torch.long
    assert seq.modality.tolist() == [0] * (len(cap) + 4) + [1] * 6 + [0, 0]
    assert seq.labels.tolist() == expected[1:] + [IGNORE_INDEX]
    assert seq.image_spans == [(len(cap) + 4, 2, 3)]
    assert seq.position_segments == [("text", len(cap) + 4), ("image", (2, 3)), ("text", 2)]
    assert torch.equal(seq.positions, multimodal_positions(seq.position_segments, "rope_tv"))
    assert seq.latents is None and len(seq) == len(expected)


def test_image_to_caption_layout(text_tokenizer: TextTokenizer) -> None:
    tok = text_tokenizer
    codes = _codes(3, 2)
    seq = build_sequence(image_to_text_document(codes, "two blue stars"), tok, scheme="mrope")
    off = tok.vocab_size  # default: codes right after the text ids and specials
    cap = tok.encode("two blue stars")
    expected = [1, 4, tok.h_token(3), tok.w_token(2), *(codes.flatten() + off).tolist(), 5, *cap, 2]
    assert seq.input_ids.tolist() == expected
    assert seq.position_segments == [("text", 4), ("image", (3, 2)), ("text", len(cap) + 2)]
    assert torch.equal(seq.positions, multimodal_positions(seq.position_segments, "mrope"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_positions_follow_the_scheme(text_tokenizer: TextTokenizer, scheme: str) -> None:
    segs = [("text", "a green star"), ("image", _codes(2, 2)), ("text", "and"), ("image", _codes(1, 3))]
    seq = build_sequence(segs, text_tokenizer, scheme=scheme)
    n1 = len(text_tokenizer.encode("a green star"))
    n2 = len(text_tokenizer.encode("and"))
    implied = [("text", 1 + n1 + 3), ("image", (2, 2)), ("text", 1 + n2 + 3), ("image", (1, 3)), ("text", 2)]
    assert seq.position_segments == implied
    assert torch.equal(seq.positions, multimodal_positions(implied, scheme))


def test_empty_caption_and_drop_caption(text_tokenizer: TextTokenizer) -> None:
    codes = _codes(1, 1)
    empty = build_sequence(text_to_image_document("", codes), text_tokenizer)
    dropped = build_sequence(text_to_image_document("a blue cross", codes), text_tokenizer, drop_caption=True)
    off = text_tokenizer.vocab_size
    expected = [1, 4, text_tokenizer.h_token(1), text_tokenizer.w_token(1), codes.item() + off, 5, 2]
    assert empty.input_ids.tolist() == dropped.input_ids.tolist() == expected
    assert torch.equal(empty.positions, dropped.positions)
    # a dropped caption's closing <eos> is not a target (it would read as an empty caption of the image)
    assert empty.labels[-2] == 2 and dropped.labels[-2] == IGNORE_INDEX
    assert torch.equal(empty.labels[:-2], dropped.labels[:-2])
    text_only = build_sequence([("text", "")], text_tokenizer)
    assert text_only.input_ids.tolist() == [1, 2] and text_only.labels.tolist() == [2, IGNORE_INDEX]


def test_unknown_characters_use_byte_fallback(text_tokenizer: TextTokenizer) -> None:
    seq = build_sequence(text_to_image_document("一个红色的圆 🔴\x07", _codes(2, 2)), text_tokenizer)
    ids = seq.input_ids.tolist()
    assert text_tokenizer.unk_id not in ids
    start = seq.image_spans[0][0]
    assert text_tokenizer.decode(ids[1 : start - 3]) == "一个红色的圆 🔴\x07"


def test_code_offset_must_not_overlap_text(text_tokenizer: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="code_offset"):
        build_sequence([("image", _codes(1, 1))], text_tokenizer, code_offset=text_tokenizer.vocab_size - 1)


def test_continuous_latents(text_tokenizer: TextTokenizer) -> None:
    lat = torch.randn(2, 3, 4)  # (h, w, c)
    seq = build_sequence(text_to_image_document("a star", lat), text_tokenizer, image_token_id=999)
    start = seq.image_spans[0][0]
    assert seq.input_ids[start : start + 6].tolist() == [999] * 6
    assert torch.equal(seq.latents, lat.reshape(6, 4))  # raster order
    assert seq.labels[start - 1 : start + 5].tolist() == [IGNORE_INDEX] * 6  # nothing predicts a placeholder
    assert seq.labels[start + 5].item() == text_tokenizer.eoi_id  # the last latent position predicts <eoi>
    assert seq.labels[start - 2].item() == text_tokenizer.w_token(3)  # <h_2> predicts <w_3>
    doc = seq.as_document()
    assert doc["latents"].shape == (len(seq), 4)
    assert torch.equal(doc["latents"][doc["latent_mask"]], seq.latents)
    assert doc["latent_mask"].sum().item() == 6
    with pytest.raises(ValueError, match="image_token_id"):
        build_sequence([("image", lat)], text_tokenizer)
    with pytest.raises(ValueError, match="all of one kind"):
        build_sequence([("image", lat), ("image", _codes(1, 1))], text_tokenizer, image_token_id=999)


def test_max_len_truncates_text_with_warning(text_tokenizer: TextTokenizer) -> None:
    long_caption = " ".join(["a red circle left of a blue star"] * 20)
    codes = _codes(3, 3)
    with pytest.warns(UserWarning, match="truncated"):
        seq = build_sequence(text_to_image_document(long_caption, codes), text_tokenizer, max_len=40)
    assert len(seq) == 40
    ids = seq.input_ids.tolist()
    assert ids[0] == 1 and ids[-1] == 2 and ids[-2] == 5 and seq.image_spans[0][1:] == (3, 3)
    full = text_tokenizer.encode(long_caption)
    assert ids[1 : 40 - 9 - 5] == full[: 40 - 9 - 6]  # caption cut at its end
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when it fits
        build_sequence(text_to_image_document("a star", codes), text_tokenizer, max_len=40)


def test_image_too_large_is_a_clear_error(text_tokenizer: TextTokenizer) -> None:
    with pytest.raises(ValueError, match=r"8x8.*max_len=50"):
        build_sequence(text_to_image_document("a star", _codes(8, 8)), text_tokenizer, max_len=50)
    with pytest.raises(ValueError, match="size token"):
        build_sequence(text_to_image_document("a star", _codes(N + 1, 2)), text_tokenizer)


@pytest.mark.parametrize(
    "segments",
    [
        [("video", "x")],
        [("text", 3)],
        [("image", torch.zeros(4, dtype=torch.long))],
        [("image", torch.zeros(2, 2, dtype=torch.bool))],
        [("image", -torch.ones(2, 2, dtype=torch.long))],
    ],
)
def test_bad_segments(text_tokenizer: TextTokenizer, segments: list) -> None:
    with pytest.raises((ValueError, TypeError)):
        build_sequence(segments, text_tokenizer)


WORDS = ["a", "red", "blue", "circle", "star", "", "🙂", "  "]
segment_st = st.one_of(
    st.lists(st.sampled_from(WORDS), max_size=4).map(lambda ws: ("text", " ".join(ws))),
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(0, 10_000)).map(
        lambda t: ("image", _codes(t[0], t[1], seed=t[2]))
    ),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(segment_st, max_size=5), st.sampled_from(SCHEMES))
def test_sequence_invariants(text_tokenizer: TextTokenizer, segments: list, scheme: str) -> None:
    tok = text_tokenizer
    off = tok.vocab_size
    seq = build_sequence(segments, tok, scheme=scheme)
    ids, n = seq.input_ids, len(seq)
    n_text = sum(len(tok.encode(v)) for k, v in segments if k == "text")
    images = [v for k, v in segments if k == "image"]
    assert n == 2 + n_text + sum(4 + im.numel() for im in images)
    assert ids[0].item() == tok.bos_id and ids[-1].item() == tok.eos_id
    # labels: shifted by one within the document, -100 at the end
    assert torch.equal(seq.labels[:-1], ids[1:]) and seq.labels[-1].item() == IGNORE_INDEX
    # positions and modality
    assert seq.positions.shape == (n, 2)
    assert torch.equal(seq.positions, multimodal_positions(seq.position_segments, scheme))
    is_img = seq.modality == 1
    assert is_img.sum().item() == sum(im.numel() for im in images)
    assert torch.all(ids[is_img] >= off) and torch.all(ids[~is_img] < off)
    text_pos = seq.positions[~is_img]  # (n_text_tokens, 2)
    assert torch.all(text_pos[:, 0] == text_pos[:, 1])
    assert torch.all(text_pos[1:, 0] > text_pos[:-1, 0])  # strictly increasing along text tokens
    # every image: <boi> <h> <w> before, codes in raster order, <eoi> after
    assert len(seq.image_spans) == len(images)
    for (start, h, w), im in zip(seq.image_spans, images):
        assert (h, w) == tuple(im.shape)
        assert ids[start - 3 : start].tolist() == [tok.boi_id, tok.h_token(h), tok.w_token(w)]
        assert torch.equal(ids[start : start + h * w], im.flatten() + off)
        assert ids[start + h * w].item() == tok.eoi_id
    # the non-special text tokens are the segments' encodings, in order (each segment encoded alone)
    plain = [i for i in ids[~is_img].tolist() if i not in tok.special_ids]
    assert plain == [i for k, v in segments if k == "text" for i in tok.encode(v)]


def test_sequences_pack_and_unpack(text_tokenizer: TextTokenizer) -> None:
    seqs = [
        build_sequence(text_to_image_document("a red star", _codes(2, 2)), text_tokenizer),
        build_sequence(image_to_text_document(_codes(3, 1), "a blue circle"), text_tokenizer),
        build_sequence([("text", "three green crosses")], text_tokenizer),
    ]
    docs = [s.as_document() for s in seqs]
    plan = pack_documents([len(s) for s in seqs], max_len=24)
    back = unpack_batch(build_packed_batch(docs, plan, 24, text_tokenizer.pad_id))
    for i, doc in enumerate(docs):
        assert all(torch.equal(back[i][k], v) for k, v in doc.items())
