"""Pack documents into fixed-length rows (DESIGN §2, "Attention masks and packing").

:func:`pack_documents` plans the rows from document lengths only (best-fit decreasing);
:func:`build_packed_batch` fills them with the documents' per-token tensors. Positions restart per
document because they come from the documents themselves; labels never cross a boundary because
each document supplies its own (shifted within the document, -100 at its end); padding is only
at the end of a row. :func:`build_padded_batch` is the one-document-per-row baseline.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100
POLICIES: tuple[str, ...] = ("split", "drop")

# A piece of a document placed in a row: (document index, start token, end token), end exclusive.
Piece = tuple[int, int, int]


@dataclass(frozen=True)
class PackPlan:
    """Which piece of which document goes where; made by :func:`pack_documents`."""

    rows: list[list[Piece]]  # per row, its pieces in row order
    max_len: int  # row length in tokens
    lengths: list[int]  # length of every input document
    num_split: int = 0  # documents longer than max_len cut into max_len chunks (policy "split")
    num_dropped: int = 0  # documents longer than max_len left out (policy "drop")

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens placed in the rows."""
        return sum(end - start for row in self.rows for _, start, end in row)

    @property
    def useful_fraction(self) -> float:
        """Real tokens / (rows * max_len); 1.0 for an empty plan."""
        return self.num_tokens / (self.num_rows * self.max_len) if self.rows else 1.0


def pack_documents(lengths: Sequence[int], max_len: int, policy: str = "split") -> PackPlan:
    """Best-fit decreasing packing of documents with these token ``lengths`` into rows of ``max_len``.

    Pieces are sorted by length, longest first (ties by document and offset); each goes into the
    row with the least remaining space that still holds it, else into a new row (the best-fit
    packing of Ding et al. 2024, "Fewer Truncations Improve Language Modeling", arXiv:2404.10830).
    A document longer than ``max_len`` is cut into ``max_len`` chunks plus a remainder ("split";
    the chunks keep the document's own positions and labels, and each chunk attends only to
    itself) or left out ("drop"). Full chunks fill whole rows that come first, so a split
    document's chunks appear in row-major order. Empty documents are skipped.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    lengths = [int(n) for n in lengths]
    pieces: list[Piece] = []
    num_split = num_dropped = 0
    for doc, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"document {doc} has negative length {n}")
        if n <= max_len:
            if n > 0:
                pieces.append((doc, 0, n))
        elif policy == "split":
            num_split += 1
            pieces.extend((doc, s, min(s + max_len, n)) for s in range(0, n, max_len))
        else:
            num_dropped += 1
    pieces.sort(key=lambda p: (-(p[2] - p[1]), p[0], p[1]))

    rows: list[list[Piece]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining space, row index) of rows that are not full
    for piece in pieces:
        n = piece[2] - piece[1]
        k = bisect.bisect_left(free, (n, -1))  # tightest row that fits; lowest index among ties
        if k < len(free):
            remaining, row = free.pop(k)
        else:
            remaining, row = max_len, len(rows)
            rows.append([])
        rows[row].append(piece)
        if remaining - n > 0:
            bisect.insort(free, (remaining - n, row))
    return PackPlan(rows=rows, max_len=max_len, lengths=lengths, num_split=num_split, num_dropped=num_dropped)


@dataclass
class TokenBatch:
    """Row tensors for a batch of documents, packed or padded.

    ``tensors[key]`` is ``(rows, max_len, ...)`` for every per-token key of the documents;
    ``doc_ids`` ``(rows, max_len)`` holds the document index of each token (-1 for padding);
    ``seq_lens[r]`` lists the lengths of row r's documents in order and ``cu_seqlens[r]`` their
    cumulative sums ``(k + 1,)`` int32 starting at 0 (for per-document / varlen attention).
    """

    tensors: dict[str, torch.Tensor]
    doc_ids: torch.Tensor
    seq_lens: list[list[int]]
    cu_seqlens: list[torch.Tensor] = field(repr=False)
    useful_fraction: float

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    @property
    def num_rows(self) -> int:
        return self.doc_ids.shape[0]


def _pad_value(key: str, pad_id: int, pad_values: Mapping[str, float | int] | None) -> float | int:
    if pad_values is not None and key in pad_values:
        return pad_values[key]
    return {"input_ids": pad_id, "labels": IGNORE_INDEX}.get(key, 0)


def _check_docs(docs: Sequence[Mapping[str, torch.Tensor]]) -> tuple[list[str], list[int]]:
    """Keys shared by all documents and each document's length; every tensor must be per-token."""
    if not docs:
        return [], []
    keys = list(docs[0].keys())
    if "input_ids" not in keys:
        raise ValueError("every document needs an 'input_ids' tensor")
    lengths = []
    for i, doc in enumerate(docs):
        if list(doc.keys()) != keys:
            raise ValueError(f"document {i} has keys {list(doc.keys())}, expected {keys}")
        n = doc["input_ids"].shape[0]
        for key in keys:
            t = doc[key]
            if t.dim() == 0 or t.shape[0] != n or t.shape[1:] != docs[0][key].shape[1:]:
                raise ValueError(
                    f"document {i}: {key!r} has shape {tuple(t.shape)}; every value must be per-token "
                    f"(n={n}, ...) with the same trailing shape in all documents"
                )
        lengths.append(n)
    return keys, lengths


def _cu(lens: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *lens], dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)  # (k+1,)


def build_packed_batch(
    docs: Sequence[Mapping[str, torch.Tensor]],
    plan: PackPlan,
    max_len: int | None = None,
    pad_id: int = 0,
    *,
    pad_values: Mapping[str, float | int] | None = None,
) -> TokenBatch:
    """Fill the rows of ``plan`` with the documents' per-token tensors.

    ``docs[i]`` maps names to tensors of shape ``(n_i, ...)`` (``input_ids``, ``positions``,
    ``labels``, ``modality``, ...). Padding: ``input_ids`` = ``pad_id``, ``labels`` = -100, every
    other key 0 (``pad_values`` overrides per key), ``doc_ids`` = -1.
    """
    if max_len is not None and max_len != plan.max_len:
        raise ValueError(f"max_len={max_len} differs from the plan's max_len={plan.max_len}")
    keys, lengths = _check_docs(docs)
    if lengths != plan.lengths:
        raise ValueError(f"document lengths {lengths} do not match the plan's {plan.lengths}")
    rows, max_len = plan.num_rows, plan.max_len
    device = docs[0]["input_ids"].device if docs else None
    out = {
        key: torch.full(
            (rows, max_len, *docs[0][key].shape[1:]),  # (rows, max_len, ...)
            _pad_value(key, pad_id, pad_values),
            dtype=docs[0][key].dtype,
            device=device,
        )
        for key in keys
    }
    doc_ids = torch.full((rows, max_len), -1, dtype=torch.long, device=device)
    seq_lens: list[list[int]] = []
    for r, row in enumerate(plan.rows):
        cursor = 0
        for doc, start, end in row:
            n = end - start
            for key in keys:
                out[key][r, cursor : cursor + n] = docs[doc][key][start:end]
            doc_ids[r, cursor : cursor + n] = doc
            cursor += n
        seq_lens.append([end - start for _, start, end in row])
    return TokenBatch(
        tensors=out,
        doc_ids=doc_ids,
        seq_lens=seq_lens,
        cu_seqlens=[_cu(lens, doc_ids.device) for lens in seq_lens],
        useful_fraction=plan.useful_fraction,
    )


def build_padded_batch(
    docs: Sequence[Mapping[str, torch.Tensor]],
    pad_id: int = 0,
    *,
    pad_values: Mapping[str, float | int] | None = None,
) -> TokenBatch:
    """Baseline: one document per row, padded at the end to the longest document of the batch."""
    keys, lengths = _check_docs(docs)
    if not docs:
        raise ValueError("build_padded_batch needs at least one document")
    width = max(max(lengths), 1)
    device = docs[0]["input_ids"].device
    out = {}
    for key in keys:
        t = torch.full(
            (len(docs), width, *docs[0][key].shape[1:]),  # (rows, width, ...)
            _pad_value(key, pad_id, pad_values),
            dtype=docs[0][key].dtype,
            device=device,
        )
        for i, doc in enumerate(docs):
            t[i, : lengths[i]] = doc[key]
        out[key] = t
    cols = torch.arange(width, device=device)  # (width,)
    lens = torch.tensor(lengths, device=device)  # (rows,)
    real = cols[None, :] < lens[:, None]  # (rows, width)
    doc_ids = torch.where(real, torch.arange(len(docs), device=device)[:, None], -1)  # (rows, width)
    seq_lens = [[n] if n else [] for n in lengths]
    return TokenBatch(
        tensors=out,
        doc_ids=doc_ids,
        seq_lens=seq_lens,
        cu_seqlens=[_cu(s, device) for s in seq_lens],
        useful_fraction=sum(lengths) / (len(docs) * width),
    )


def join_rows(batch: TokenBatch, limit: int, pad_id: int = 0) -> TokenBatch:
    """The rows without the padding at their ends, concatenated in order into as few rows of at most
    ``limit`` tokens as a greedy pass gives (one row when the batch's real tokens fit).

    Packed rows end in padding (~3% of the shapes + digits rows) that every matmul of a training step
    would still process; joined, only real tokens are computed. Exact for attention within documents:
    each document keeps its tokens, order, positions and labels (labels are already shifted per token),
    and ``seq_lens`` lists the same documents. Rows are joined whole, never split. Padding of the joined
    rows (when there are several): ``input_ids`` = ``pad_id``, ``labels`` = -100, other keys 0, doc -1.
    """
    sizes = [sum(lens) for lens in batch.seq_lens]
    if not sizes:
        return batch
    if any(n > limit for n in sizes):
        raise ValueError(f"a row holds {max(sizes)} real tokens, more than the limit of {limit}")
    groups: list[list[int]] = []
    total = limit + 1
    for r, n in enumerate(sizes):
        if total + n > limit:
            groups.append([])
            total = 0
        groups[-1].append(r)
        total += n
    width = max(max(sum(sizes[r] for r in g) for g in groups), 1)

    def join(t: torch.Tensor, fill: float | int) -> torch.Tensor:
        out = t.new_full((len(groups), width, *t.shape[2:]), fill)  # (joined rows, width, ...)
        for j, group in enumerate(groups):
            pieces = [t[r, : sizes[r]] for r in group]  # each (n_r, ...)
            joined = torch.cat(pieces) if pieces else t[:0, 0]
            out[j, : joined.shape[0]] = joined
        return out

    tensors = {key: join(t, _pad_value(key, pad_id, None)) for key, t in batch.tensors.items()}
    seq_lens = [[n for r in group for n in batch.seq_lens[r]] for group in groups]
    real = sum(sizes)
    return TokenBatch(
        tensors=tensors,
        doc_ids=join(batch.doc_ids, -1),
        seq_lens=seq_lens,
        cu_seqlens=[_cu(lens, batch.doc_ids.device) for lens in seq_lens],
        useful_fraction=real / (len(groups) * width),
    )


def unpack_batch(batch: TokenBatch) -> dict[int, dict[str, torch.Tensor]]:
    """Inverse of packing: per document index, its tokens gathered from the rows in row-major order."""
    flat_ids = batch.doc_ids.reshape(-1)  # (rows * max_len,)
    docs: dict[int, dict[str, torch.Tensor]] = {}
    for doc in torch.unique(flat_ids[flat_ids >= 0]).tolist():
        sel = flat_ids == doc  # (rows * max_len,)
        docs[doc] = {
            key: t.reshape(-1, *t.shape[2:])[sel]  # (rows * max_len, ...) -> (n_doc, ...)
            for key, t in batch.tensors.items()
        }
    return docs
