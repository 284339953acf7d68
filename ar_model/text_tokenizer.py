"""SentencePiece text tokenizer for captions, with the special tokens of the interleaved format.

Fixed ids (the same for every trained tokenizer, ``N = max_image_side``)::

    0 <pad>   1 <bos>   2 <eos>   3 <unk>   4 <boi>   5 <eoi>
    6 .. 5+N        <h_1> .. <h_N>    image height in tokens
    6+N .. 5+2N     <w_1> .. <w_N>    image width in tokens
    6+2N .. 261+2N  <0x00> .. <0xFF>  byte-fallback pieces
    262+2N ..       learned pieces

``<boi>``, ``<eoi>`` and the size tokens are SentencePiece *control* symbols: the encoder never
produces them from text (a caption that literally says "<boi>" is encoded as characters) and the
decoder drops them. Normalization is ``identity`` with ``remove_extra_whitespaces=False``, so
``decode(encode(s)) == s`` for any string without the meta symbol U+2581 (which SentencePiece
uses for spaces and decodes to " "); ``byte_fallback`` encodes characters outside the vocabulary
as UTF-8 bytes, so no input is unknown.

A tokenizer is stored as SentencePiece's own model protobuf (``*.model``); loading parses only
that (no pickle).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID, UNK_ID, BOI_ID, EOI_ID = 0, 1, 2, 3, 4, 5
FIRST_SIZE_ID = 6
MODEL_TYPES: tuple[str, ...] = ("unigram", "bpe")
_META = {PAD_ID: "<pad>", BOS_ID: "<bos>", EOS_ID: "<eos>", UNK_ID: "<unk>", BOI_ID: "<boi>", EOI_ID: "<eoi>"}


def _size_pieces(max_image_side: int) -> list[str]:
    sides = range(1, max_image_side + 1)
    return [f"<h_{i}>" for i in sides] + [f"<w_{i}>" for i in sides]


def num_reserved_ids(max_image_side: int) -> int:
    """Ids taken before any learned piece: 6 specials, 2N size tokens, 256 byte pieces."""
    return FIRST_SIZE_ID + 2 * max_image_side + 256


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` via a temp file in the same folder and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TextTokenizer:
    """A trained SentencePiece model plus the fixed special-token layout above."""

    def __init__(self, model_proto: bytes) -> None:
        """Wrap serialized SentencePiece model bytes; checks that the special tokens are in place."""
        self._proto = bytes(model_proto)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except RuntimeError as err:
            raise ValueError(f"not a SentencePiece model protobuf: {err}") from err
        sp = self._sp
        for i, piece in _META.items():
            if sp.id_to_piece(i) != piece:
                raise ValueError(
                    f"not a project text tokenizer: id {i} is {sp.id_to_piece(i)!r}, not {piece}"
                )
        if (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise ValueError("not a project text tokenizer: pad/bos/eos/unk ids are not 0/1/2/3")
        n = 0
        while FIRST_SIZE_ID + n < sp.get_piece_size() and sp.id_to_piece(FIRST_SIZE_ID + n) == f"<h_{n + 1}>":
            n += 1
        if n == 0 or [sp.id_to_piece(FIRST_SIZE_ID + k) for k in range(2 * n)] != _size_pieces(n):
            raise ValueError("not a project text tokenizer: size tokens <h_k>/<w_k> missing or out of order")
        self._max_side = n
        self._special_ids = frozenset(range(FIRST_SIZE_ID + 2 * n))

    # --- construction and storage ---------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> TextTokenizer:
        """Read a ``*.model`` file written by :meth:`save` (SentencePiece protobuf only)."""
        return cls(Path(path).read_bytes())

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model protobuf atomically; returns the path."""
        atomic_write_bytes(path, self._proto)
        return Path(path)

    @property
    def serialized(self) -> bytes:
        """The SentencePiece model protobuf."""
        return self._proto

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of the model bytes: identifies the tokenizer in checkpoints and code shards."""
        return hashlib.sha256(self._proto).hexdigest()

    # --- ids --------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of text ids, specials included; image codes start at or after this."""
        return self._sp.get_piece_size()

    @property
    def max_image_side(self) -> int:
        """N: the largest image height/width in tokens that has a size token."""
        return self._max_side

    pad_id = property(lambda self: PAD_ID, doc="<pad> id (0).")
    bos_id = property(lambda self: BOS_ID, doc="<bos> id (1).")
    eos_id = property(lambda self: EOS_ID, doc="<eos> id (2).")
    unk_id = property(lambda self: UNK_ID, doc="<unk> id (3); never produced thanks to byte fallback.")
    boi_id = property(lambda self: BOI_ID, doc="<boi> id (4).")
    eoi_id = property(lambda self: EOI_ID, doc="<eoi> id (5).")

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of <pad> <bos> <eos> <unk> <boi> <eoi> and all size tokens."""
        return self._special_ids

    def _check_side(self, value: int, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self._max_side:
            raise ValueError(
                f"image {what} {value!r} tokens has no size token: this tokenizer covers 1..{self._max_side} "
                f"(train it with a larger max_image_side)"
            )
        return value

    def h_token(self, h: int) -> int:
        """Id of ``<h_h>`` (image height ``h`` in tokens)."""
        return FIRST_SIZE_ID + self._check_side(h, "height") - 1

    def w_token(self, w: int) -> int:
        """Id of ``<w_w>`` (image width ``w`` in tokens)."""
        return FIRST_SIZE_ID + self._max_side + self._check_side(w, "width") - 1

    def is_h_token(self, token_id: int) -> bool:
        return FIRST_SIZE_ID <= token_id < FIRST_SIZE_ID + self._max_side

    def is_w_token(self, token_id: int) -> bool:
        return FIRST_SIZE_ID + self._max_side <= token_id < FIRST_SIZE_ID + 2 * self._max_side

    def size_from_tokens(self, h_id: int, w_id: int) -> tuple[int, int]:
        """``(h, w)`` from the ids of ``<h_h>`` and ``<w_w>``."""
        if not self.is_h_token(h_id) or not self.is_w_token(w_id):
            raise ValueError(f"({h_id}, {w_id}) are not (<h_k>, <w_k>) size token ids")
        return h_id - FIRST_SIZE_ID + 1, w_id - FIRST_SIZE_ID - self._max_side + 1

    # --- text -------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text to ids, without <bos>/<eos>; never fails on unknown characters (byte fallback)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text, skipping special tokens; ids outside the text vocabulary are an error."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the text vocabulary [0, {self.vocab_size})")
        return self._sp.decode([i for i in ids if i not in self._special_ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(vocab_size={self.vocab_size}, max_image_side={self._max_side}, "
            f"fingerprint={self.fingerprint[:12]})"
        )


def _sentences(captions: Iterable[str], errors: list[Exception]) -> Iterator[str]:
    """Non-empty captions; a non-str caption stops the stream and is recorded in ``errors``."""
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            errors.append(TypeError(f"caption {i} is {type(caption).__name__}, expected str"))
            return
        if caption:
            yield caption


def train_text_tokenizer(
    captions: Iterable[str],
    out_path: str | os.PathLike | None,
    vocab_size: int,
    model_type: str = "bpe",
    max_image_side: int = 64,
    *,
    hard_vocab_limit: bool = False,
    character_coverage: float = 0.9995,
    num_threads: int = 1,
) -> TextTokenizer:
    """Train a SentencePiece model on ``captions`` in memory; save it to ``out_path`` if given.

    ``vocab_size`` counts every id (specials, 2N size tokens and 256 byte pieces included). With
    ``hard_vocab_limit=False`` (default) it is an upper bound: a corpus with fewer distinct pieces
    (a tiny caption set) yields a smaller vocabulary instead of an error.

    The default ``model_type`` is ``"bpe"``: on small templated caption sets (the shapes data)
    SentencePiece's unigram trainer keeps only a few dozen pieces and splits common words
    ("re" + "d"), while BPE learns whole words. ``num_threads=1`` keeps training deterministic:
    the same captions give the same bytes.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if isinstance(max_image_side, bool) or not isinstance(max_image_side, int) or max_image_side < 1:
        raise ValueError(f"max_image_side must be a positive int, got {max_image_side!r}")
    reserved = num_reserved_ids(max_image_side)
    if vocab_size <= reserved:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for learned pieces: {reserved} ids are reserved "
            f"(6 specials + 2*{max_image_side} size tokens + 256 bytes)"
        )
    model = io.BytesIO()
    errors: list[Exception] = []  # SentencePiece would wrap an exception raised inside the iterator
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(captions, errors),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=hard_vocab_limit,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            pad_piece=_META[PAD_ID],
            bos_piece=_META[BOS_ID],
            eos_piece=_META[EOS_ID],
            unk_piece=_META[UNK_ID],
            control_symbols=[_META[BOI_ID], _META[EOI_ID], *_size_pieces(max_image_side)],
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            character_coverage=character_coverage,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        if errors:
            raise errors[0] from None
        raise ValueError(
            f"SentencePiece could not train a {model_type} model with vocab_size={vocab_size} on these "
            f"captions ({reserved} ids are reserved). If the vocabulary is too large for the corpus, lower "
            f"vocab_size or use hard_vocab_limit=False; if it is too small for the corpus's characters, "
            f"raise it. "
            f"SentencePiece said: {err}"
        ) from err
    if errors:
        raise errors[0]
    tokenizer = TextTokenizer(model.getvalue())
    if out_path is not None:
        tokenizer.save(out_path)
    return tokenizer
