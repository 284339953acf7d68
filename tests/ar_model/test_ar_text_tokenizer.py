"""Text tokenizer: fixed special ids, exact round trips, byte fallback, deterministic training, storage."""

from __future__ import annotations

import io

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from ar_model.text_tokenizer import TextTokenizer, num_reserved_ids, train_text_tokenizer

N = 16  # the shared fixture's max_image_side


def test_fixed_special_ids(text_tokenizer: TextTokenizer) -> None:
    tok = text_tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.boi_id, tok.eoi_id) == (0, 1, 2, 3, 4, 5)
    pieces = [tok.id_to_piece(i) for i in range(6)]
    assert pieces == ["<pad>", "<bos>", "<eos>", "<unk>", "<boi>", "<eoi>"]
    assert tok.max_image_side == N
    assert tok.h_token(1) == 6 and tok.h_token(N) == 5 + N
    assert tok.w_token(1) == 6 + N and tok.w_token(N) == 5 + 2 * N
    assert tok.id_to_piece(tok.h_token(3)) == "<h_3>" and tok.id_to_piece(tok.w_token(7)) == "<w_7>"
    assert tok.id_to_piece(6 + 2 * N) == "<0x00>" and tok.id_to_piece(5 + 2 * N + 256) == "<0xFF>"
    assert tok.special_ids == frozenset(range(6 + 2 * N))
    for h in range(1, N + 1):
        for w in (1, h, N):
            assert tok.size_from_tokens(tok.h_token(h), tok.w_token(w)) == (h, w)


def test_default_side_layout() -> None:
    tok = train_text_tokenizer(
        ["a red circle", "two blue squares"] * 20, None, vocab_size=num_reserved_ids(64) + 40
    )
    assert tok.max_image_side == 64 and tok.h_token(64) == 69
    assert tok.w_token(1) == 70 and tok.w_token(64) == 133


@pytest.mark.parametrize("bad", [0, N + 1, -3, True, 2.0])
def test_size_tokens_out_of_range(text_tokenizer: TextTokenizer, bad: object) -> None:
    with pytest.raises(ValueError, match="size token"):
        text_tokenizer.h_token(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size token"):
        text_tokenizer.w_token(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        text_tokenizer.size_from_tokens(text_tokenizer.w_token(1), text_tokenizer.h_token(1))  # swapped


def test_captions_round_trip_and_specials_are_skipped(
    text_tokenizer: TextTokenizer, captions: list[str]
) -> None:
    tok = text_tokenizer
    for caption in captions[:50] + ["", " ", "  two  spaces ", "a red circle.\n", "Tab\there, CAPS!"]:
        ids = tok.encode(caption)
        assert tok.decode(ids) == caption
        assert not set(ids) & tok.special_ids
        image = [tok.boi_id, tok.h_token(2), tok.w_token(3), tok.eoi_id]
        framed = [tok.bos_id, *ids, *image, tok.eos_id, tok.pad_id]
        assert tok.decode(framed) == caption
    assert len(tok.encode("a red circle")) <= 3  # BPE learns the caption words on this corpus


def test_byte_fallback_for_unknown_characters(text_tokenizer: TextTokenizer) -> None:
    tok = text_tokenizer
    for text in ["emoji 😀🎨", "中文字幕", "control \x00\x01\x1b\x7f end", "naïve café", "\u200b zero width"]:
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text


def test_literal_special_strings_are_plain_text(text_tokenizer: TextTokenizer) -> None:
    ids = text_tokenizer.encode("<boi> <h_3> <eos>")
    assert not set(ids) & text_tokenizer.special_ids
    assert text_tokenizer.decode(ids) == "<boi> <h_3> <eos>"


@settings(max_examples=60, deadline=None)
# Any text but surrogates and U+2581, SentencePiece's space symbol (decoded as " ").
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=40))
def test_any_text_round_trips(text_tokenizer: TextTokenizer, text: str) -> None:
    assert text_tokenizer.decode(text_tokenizer.encode(text)) == text


def test_decode_rejects_ids_outside_text_vocab(text_tokenizer: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="outside"):
        text_tokenizer.decode([text_tokenizer.vocab_size])


def test_training_is_deterministic(captions: list[str], text_tokenizer: TextTokenizer) -> None:
    again = train_text_tokenizer(iter(captions), None, vocab_size=400, max_image_side=N)
    assert again.serialized == text_tokenizer.serialized
    assert again.fingerprint == text_tokenizer.fingerprint and len(again.fingerprint) == 64
    other = train_text_tokenizer(captions[:100], None, vocab_size=400, max_image_side=N)
    assert other.fingerprint != text_tokenizer.fingerprint


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_vocab_size_respected(captions: list[str], model_type: str) -> None:
    reserved = num_reserved_ids(N)
    soft = train_text_tokenizer(
        captions, None, vocab_size=reserved + 2000, model_type=model_type, max_image_side=N
    )
    assert reserved < soft.vocab_size <= reserved + 2000  # soft limit: a tiny corpus gives fewer pieces
    exact = reserved + 30
    hard = train_text_tokenizer(
        captions, None, vocab_size=exact, model_type=model_type, max_image_side=N, hard_vocab_limit=True
    )
    assert hard.vocab_size == exact
    with pytest.raises(ValueError, match="vocab_size"):
        train_text_tokenizer(
            captions, None, vocab_size=reserved + 5000, max_image_side=N, hard_vocab_limit=True
        )
    with pytest.raises(ValueError, match="reserved"):
        train_text_tokenizer(captions, None, vocab_size=reserved, max_image_side=N)


def test_bad_training_input(captions: list[str]) -> None:
    with pytest.raises(ValueError):
        train_text_tokenizer(["", ""], None, vocab_size=400, max_image_side=N)
    with pytest.raises(TypeError):
        train_text_tokenizer([*captions[:5], 3], None, vocab_size=400, max_image_side=N)  # type: ignore[list-item]
    with pytest.raises(ValueError):
        train_text_tokenizer(captions, None, vocab_size=400, model_type="word")


def test_save_load_round_trip(tmp_path, captions: list[str], text_tokenizer: TextTokenizer) -> None:
    path = tmp_path / "sub" / "text.model"
    trained = train_text_tokenizer(captions, path, vocab_size=400, max_image_side=N)
    assert path.read_bytes() == trained.serialized == text_tokenizer.serialized
    assert [p.name for p in path.parent.iterdir()] == ["text.model"]  # no temp file left behind
    loaded = TextTokenizer.load(path)
    assert loaded.fingerprint == trained.fingerprint and loaded.vocab_size == trained.vocab_size
    assert loaded.encode(captions[0]) == trained.encode(captions[0])
    loaded.save(tmp_path / "copy.model")
    assert (tmp_path / "copy.model").read_bytes() == trained.serialized


def test_load_rejects_other_models(tmp_path, captions: list[str]) -> None:
    with pytest.raises(ValueError, match="SentencePiece"):
        TextTokenizer(b"definitely not a protobuf")
    plain = io.BytesIO()  # a SentencePiece model with the library's default special ids
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=plain,
        vocab_size=60,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="not a project text tokenizer"):
        TextTokenizer(plain.getvalue())
