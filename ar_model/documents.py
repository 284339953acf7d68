"""Training documents for Stage 2: image tokens + captions → packed rows, as a pure function of the step.

Every sample ``(tokens, caption)`` becomes one document per epoch, in one of the two orders the model
learns (issue 3). Image tokens are discrete codes ``(h, w)`` or continuous (normalized) latents
``(h, w, D)`` (issue 4): latents sit at placeholder ids and travel beside ``input_ids`` as per-token
``latents (n, D)`` and ``latent_mask (n,)`` (zeros / false elsewhere, also in documents without an
image), so a packed batch carries ``latents (rows, max_len, D)`` aligned with its ``input_ids``.

* text-to-image ``<bos> caption <boi> <h> <w> codes <eoi> <eos>`` with probability ``t2i_fraction``;
  its caption is dropped to empty with probability ``caption_drop`` (the unconditional branch of
  classifier-free guidance, Ho & Salimans 2022), and then its ``<eos>`` is not a target (``build_sequence``):
  such a document reads exactly as an image-to-text one up to ``<eoi>``, where a caption must follow;
* image-to-text ``<bos> <boi> <h> <w> codes <eoi> caption <eos>`` otherwise.

Both cost ``len(caption) + h·w + 6`` tokens. An epoch's documents (order, direction, drops) are drawn
from ``(seed, epoch)``; the epoch's documents are packed
(best-fit decreasing) into rows of ``max_len`` tokens, and the shuffled rows are cut into batches of
``tokens_per_batch // max_len`` rows.
Batch ``j`` of the epoch goes to rank ``j % world``, so every rank's micro-step ``m`` maps to one
batch and a resumed run continues exactly where it stopped, mid-epoch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ar_model.packing import PackPlan, TokenBatch, build_packed_batch, pack_documents
from ar_model.sequence import build_sequence, image_to_text_document, text_to_image_document
from ar_model.text_tokenizer import TextTokenizer

T2I, I2T = 0, 1  # values of the per-token "task" tensor
DOC_OVERHEAD = 6  # <bos> <boi> <h> <w> <eoi> <eos>


@dataclass(frozen=True)
class DocSpec:
    """One planned document: which sample, which order, and whether its caption is dropped."""

    sample: int
    task: int  # T2I or I2T
    drop_caption: bool


class CodesCorpus:
    """Image tokens with their captions, tokenized once (captions cut to fit ``max_len``).

    ``codes`` is an integer tensor ``(N, h, w)`` of discrete codes, an integer tensor ``(N, h, w, G)`` of
    grouped codes (:func:`ar_model.code_groups.group_codes`), or a float tensor ``(N, h, w, D)`` of
    continuous latents, already normalized with the tokenizer's stats (the decoder sees them as they are).
    """

    def __init__(self, codes: torch.Tensor, captions: list[str], tokenizer: TextTokenizer, max_len: int):
        continuous = codes.is_floating_point()
        if (
            codes.dim() not in ((4,) if continuous else (3, 4))
            or codes.dtype == torch.bool
            or codes.is_complex()
        ):
            raise ValueError(
                "codes must be an integer tensor (N, h, w) or (N, h, w, G) (grouped), or a float tensor "
                f"(N, h, w, D) of latents, got {tuple(codes.shape)} {codes.dtype}"
            )
        if continuous and not bool(torch.isfinite(codes).all()):
            raise ValueError("continuous latents hold NaN or inf (are the tokenizer's latent_std all > 0?)")
        if len(captions) != codes.shape[0]:
            raise ValueError(f"{codes.shape[0]} code grids but {len(captions)} captions")
        h, w = codes.shape[1:3]
        budget = max_len - h * w - DOC_OVERHEAD  # tokens left for the caption
        if budget < 0:
            raise ValueError(
                f"an image of {h}x{w} tokens needs {h * w + DOC_OVERHEAD} tokens per document with its "
                f"{DOC_OVERHEAD} special tokens, more than max_len={max_len}; raise max_len"
            )
        self.codes, self.captions, self.tokenizer = codes, captions, tokenizer
        ids = [tokenizer.encode(c) for c in captions]
        self.num_truncated = sum(len(x) > budget for x in ids)
        if self.num_truncated:
            warnings.warn(
                f"{self.num_truncated} captions are longer than the {budget} tokens that fit in max_len="
                f"{max_len} beside a {h}x{w} image and were truncated",
                stacklevel=2,
            )
        self.caption_ids = [x[:budget] for x in ids]
        # the text build_sequence encodes again: the caption itself, or its truncation decoded
        self.texts = [c if len(x) <= budget else tokenizer.decode(x[:budget]) for c, x in zip(captions, ids)]

    def __len__(self) -> int:
        return self.codes.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.codes.shape[1]), int(self.codes.shape[2])

    @property
    def latent_dim(self) -> int:
        """Channels of a continuous token; 0 for discrete codes."""
        return int(self.codes.shape[3]) if self.codes.is_floating_point() else 0

    @property
    def grouped(self) -> bool:
        """True for grouped codes ``(N, h, w, G)``."""
        return self.codes.dim() == 4 and not self.codes.is_floating_point()

    def length(self, spec: DocSpec) -> int:
        h, w = self.grid
        return (0 if spec.drop_caption else len(self.caption_ids[spec.sample])) + h * w + DOC_OVERHEAD

    def document(self, spec: DocSpec, scheme: str, code_offset: int) -> dict[str, torch.Tensor]:
        """Per-token tensors of one document (``input_ids, positions, labels, modality``, for latents
        ``latents, latent_mask``, for grouped codes ``code_groups``, then ``task``). Latents and grouped
        codes sit at the placeholder id ``code_offset`` (the decoder's ``latent_token_id`` /
        ``group_token_id``)."""
        caption = self.texts[spec.sample]
        codes = self.codes[spec.sample]
        if spec.task == T2I:
            segments = text_to_image_document(caption, codes)
        else:
            segments = image_to_text_document(codes, caption)
        seq = build_sequence(
            segments,
            self.tokenizer,
            scheme=scheme,
            code_offset=code_offset,
            image_token_id=code_offset if self.latent_dim or self.grouped else None,
            drop_caption=spec.drop_caption,
        )
        doc = seq.as_document()
        doc["task"] = torch.full((len(seq),), spec.task, dtype=torch.long)
        return doc


def plan_epoch(
    num_samples: int, epoch: int, seed: int, t2i_fraction: float, caption_drop: float
) -> list[DocSpec]:
    """The epoch's documents: a seeded permutation of the samples with a direction and drop each."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=g).tolist()
    t2i = (torch.rand(num_samples, generator=g) < t2i_fraction).tolist()
    drop = (torch.rand(num_samples, generator=g) < caption_drop).tolist()
    return [DocSpec(s, T2I if t else I2T, bool(t and d)) for s, t, d in zip(order, t2i, drop)]


def epoch_batches(
    lengths: list[int], max_len: int, rows: int, generator: torch.Generator
) -> list[list[list[int]]]:
    """All documents packed into rows of ``max_len`` (best-fit decreasing, :func:`pack_documents`), the rows
    shuffled, then cut into batches of ``rows`` rows; returns per batch, per row, its document indices.

    Packing the whole epoch at once fills rows far better than packing each batch's documents alone
    (a few tokens of padding per row instead of a partly empty last row); shuffling the rows keeps the
    batches i.i.d. although best fit groups documents of similar length into a row.
    """
    plan = pack_documents(lengths, max_len)
    order = torch.randperm(plan.num_rows, generator=generator).tolist()
    packed = [[doc for doc, _, _ in plan.rows[r]] for r in order]
    return [packed[i : i + rows] for i in range(0, len(packed), rows)]


class PackedBatches:
    """Rank-sharded packed batches of a :class:`CodesCorpus`; micro-step ``m`` → one ``TokenBatch``."""

    def __init__(
        self,
        corpus: CodesCorpus,
        *,
        max_len: int,
        tokens_per_batch: int,
        scheme: str,
        code_offset: int,
        pad_id: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        t2i_fraction: float = 0.75,
        caption_drop: float = 0.1,
    ):
        if tokens_per_batch < max_len:
            raise ValueError(f"tokens_per_batch={tokens_per_batch} must be ≥ max_len={max_len}")
        self.corpus, self.max_len, self.rows = corpus, max_len, tokens_per_batch // max_len
        self.scheme, self.code_offset, self.pad_id = scheme, code_offset, pad_id
        self.rank, self.world, self.seed = rank, world, seed
        self.t2i_fraction, self.caption_drop = t2i_fraction, caption_drop
        self._epoch, self._specs, self._batches = -1, [], []
        self._load_epoch(0)
        # the last, partial batch of an epoch is dropped; all ranks see the same count
        self.batches_per_epoch = sum(len(b) == self.rows for b in self._batches) // world
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{len(corpus)} documents fill {len(self._batches)} batches of {self.rows} rows × {max_len} "
                f"tokens, fewer than the {world} processes; lower tokens_per_batch or add data"
            )

    def _load_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        self._specs = plan_epoch(len(self.corpus), epoch, self.seed, self.t2i_fraction, self.caption_drop)
        lengths = [self.corpus.length(s) for s in self._specs]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 7)
        self._batches = epoch_batches(lengths, self.max_len, self.rows, g)
        self._epoch = epoch

    def specs(self, micro_step: int) -> list[list[DocSpec]]:
        """Per row, the documents of this rank's batch at ``micro_step``."""
        epoch, b = divmod(micro_step, self.batches_per_epoch)
        self._load_epoch(epoch)
        # Caption drops change document lengths, so a later epoch can pack into one batch fewer than
        # epoch 0 (which set batches_per_epoch); its last index then falls back to the last batch.
        index = min(b * self.world + self.rank, len(self._batches) - 1)
        return [[self._specs[d] for d in row] for row in self._batches[index]]

    def get(self, micro_step: int) -> TokenBatch:
        return batch_from_rows(
            self.corpus, self.specs(micro_step), self.max_len, self.scheme, self.code_offset, self.pad_id
        )


def batch_from_rows(
    corpus: CodesCorpus, rows: list[list[DocSpec]], max_len: int, scheme: str, code_offset: int, pad_id: int
) -> TokenBatch:
    """Build the documents and lay them out in exactly these rows (padding only at each row's end)."""
    docs, plan_rows = [], []
    for row in rows:
        plan_rows.append([])
        for spec in row:
            doc = corpus.document(spec, scheme, code_offset)
            n = doc["input_ids"].shape[0]
            plan_rows[-1].append((len(docs), 0, n))
            docs.append(doc)
    docs = with_latents(docs, corpus.latent_dim)
    lengths = [d["input_ids"].shape[0] for d in docs]
    plan = PackPlan(rows=plan_rows, max_len=max_len, lengths=lengths)
    if any(sum(e - s for _, s, e in row) > max_len for row in plan_rows):
        plan = pack_documents(lengths, max_len)  # a re-encoded caption came out longer than planned
    return build_packed_batch(docs, plan, pad_id=pad_id)


def with_latents(docs: list[dict[str, torch.Tensor]], latent_dim: int) -> list[dict[str, torch.Tensor]]:
    """Give every document ``latents (n, latent_dim)`` and ``latent_mask (n,)`` (zeros and false where it
    has none, e.g. a text-only document), placed before ``task``, so that documents with and without
    images pack into one batch whose latents line up with ``input_ids``. ``latent_dim = 0``: unchanged."""
    if not latent_dim:
        return docs
    out = []
    for doc in docs:
        n = doc["input_ids"].shape[0]
        latents = doc.get("latents")
        if latents is not None and latents.shape[-1] != latent_dim:
            raise ValueError(f"a document has {latents.shape[-1]}-channel latents, expected {latent_dim}")
        if latents is None:
            latents = torch.zeros(n, latent_dim, device=doc["input_ids"].device)  # (n, D)
        mask = doc.get("latent_mask")
        if mask is None:
            mask = torch.zeros(n, dtype=torch.bool, device=doc["input_ids"].device)  # (n,)
        rest = {k: v for k, v in doc.items() if k not in ("latents", "latent_mask", "task")}
        tail = {"task": doc["task"]} if "task" in doc else {}
        out.append({**rest, "latents": latents, "latent_mask": mask, **tail})
    return out


def eval_batches(
    corpus: CodesCorpus, max_len: int, tokens_per_batch: int, scheme: str, code_offset: int, pad_id: int
) -> list[TokenBatch]:
    """Every sample once in each order, captions kept: a fixed validation set."""
    specs = [DocSpec(i, task, False) for task in (T2I, I2T) for i in range(len(corpus))]
    lengths = [corpus.length(s) for s in specs]
    batches = epoch_batches(lengths, max_len, tokens_per_batch // max_len, torch.Generator().manual_seed(0))
    return [
        batch_from_rows(
            corpus, [[specs[d] for d in row] for row in rows], max_len, scheme, code_offset, pad_id
        )
        for rows in batches
    ]
