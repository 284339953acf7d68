"""Attention over packed rows and the KV cache (DESIGN §2 "Attention masks and packing", issue 3 "Packing").

A packed row holds several documents end to end, then padding. Every token attends causally to the
tokens of its own document only. :func:`plan_attention` decides once per forward *how* (the plan is
shared by all layers); :func:`attend` runs it on ``(b, h, n, d)`` queries, keys and values:

* ``causal``: one causal SDPA call over whole rows (no documents given, or at most one document per row,
  e.g. padded batches: causal attention is then exact for every real token);
* ``per_doc`` (``attn_impl="sdpa_per_doc"``, the CPU training default): gather the tokens of every
  document, run one causal SDPA call per *bucket of document lengths* (documents of equal or similar
  length are batched together, the shorter ones padded at their end) and scatter the outputs back; row
  padding is skipped and its outputs are zero. A packed row
  then costs what its documents cost, with no ``n × n`` mask (issue 3 measured 31.8 ms against
  143.7 ms for a dense mask, 8 documents in 2,048 tokens, fwd+bwd);
* ``dense`` (``attn_impl="sdpa_dense_mask"``): one SDPA call with a block-diagonal ∧ causal boolean
  mask ``(b, 1, n, n)``; the reference, and the path for key-padding masks of left-padded prompts;
* ``flex``: ``flex_attention`` with a block mask (GPU; torch 2.13 has no CPU backward for it);
* ``varlen``: ``flash_attn.flash_attn_varlen_func`` (GPU, if flash-attn is installed);
* ``cached``: queries against a :class:`KVCache` (generation), optional key-padding mask.

Every query sees at least itself, so no softmax row is empty and no NaN appears (padding included).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:  # optional GPU kernel
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - not installed on the CPU machines
    flash_attn_varlen_func = None

_TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
_SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)  # enable_gqa appeared in torch 2.5


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """SDPA for ``q (b, h, n, d)`` and ``k, v (b, h_kv, m, d)`` with ``h`` a multiple of ``h_kv`` (GQA)."""
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
    groups = q.shape[1] // k.shape[1]  # pragma: no cover - torch < 2.5
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (b, h, m, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


# ----------------------------------------------------------------------------- documents and masks
def seq_lens_from_doc_ids(doc_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the lengths of its runs of equal non-negative document ids (reads the tensor on the host)."""
    out = []
    for row in doc_ids.tolist():
        lens: list[int] = []
        prev = None
        for d in row:
            if d < 0:
                break  # padding only at the end of a row
            if d == prev:
                lens[-1] += 1
            else:
                lens.append(1)
            prev = d
        out.append(lens)
    return out


def doc_ids_from_seq_lens(
    seq_lens: list[list[int]], n: int, device: torch.device | None = None
) -> torch.Tensor:
    """``(b, n)`` document index per token (0, 1, ... within each row; -1 for padding)."""
    doc_ids = torch.full((len(seq_lens), n), -1, dtype=torch.long)
    for r, lens in enumerate(seq_lens):
        cursor = 0
        for k, length in enumerate(lens):
            doc_ids[r, cursor : cursor + length] = k
            cursor += length
    return doc_ids.to(device)


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """``(b, 1, n, n)`` bool: query ``i`` sees key ``j <= i`` of the same document; padding sees itself."""
    n = doc_ids.shape[-1]
    idx = torch.arange(n, device=doc_ids.device)
    causal = idx[:, None] >= idx[None, :]  # (n, n)
    same = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, :, None] >= 0)  # (b, n, n)
    mask = (same & causal) | (idx[:, None] == idx[None, :])  # (b, n, n): the diagonal keeps padding finite
    return mask[:, None]  # (b, 1, n, n)


def padding_causal_mask(key_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """``(b, 1, q, m)`` bool for the last ``q_len`` of ``m`` tokens: causal ∧ real keys, plus the diagonal.

    ``key_mask (b, m)`` is true for real tokens (False for left padding). The diagonal keeps padded
    queries finite; their outputs are never used.
    """
    m = key_mask.shape[-1]
    qpos = torch.arange(m - q_len, m, device=key_mask.device)  # (q,): absolute positions of the queries
    kpos = torch.arange(m, device=key_mask.device)  # (m,)
    causal = qpos[:, None] >= kpos[None, :]  # (q, m)
    mask = (causal & key_mask[:, None, :].bool()) | (qpos[:, None] == kpos[None, :])  # (b, q, m)
    return mask[:, None]  # (b, 1, q, m)


# ----------------------------------------------------------------------------- plan
@dataclass
class AttentionPlan:
    """How every layer attends in one forward; built once by :func:`plan_attention`."""

    kind: str  # "causal" | "per_doc" | "dense" | "flex" | "varlen" | "cached"
    mask: torch.Tensor | None = None  # dense / cached: bool (b, 1, q, m); None = no mask
    is_causal: bool = False  # cached: top-left causal (only valid without past tokens)
    gather: torch.Tensor | None = None  # per_doc: (G,) flat token index of every slot, bucket by bucket
    scatter: torch.Tensor | None = None  # per_doc: (b*n,) index into [slot outputs; zero row]
    groups: list[tuple[int, int]] = field(default_factory=list)  # per_doc: (padded length L, count k)
    block_mask: object = None  # flex: BlockMask
    cu_seqlens: torch.Tensor | None = None  # varlen: (segments + 1,) int32 over the flattened rows
    max_seqlen: int = 0  # varlen


PER_DOC_PAD = 0.125  # a document shares the SDPA call of documents up to 12.5% longer, padded to their length


def _per_doc_plan(seq_lens: list[list[int]], n: int, device: torch.device) -> AttentionPlan:
    """Bucket the documents by length; ``gather`` lists their tokens bucket by bucket, padded.

    Documents whose lengths are within :data:`PER_DOC_PAD` of the longest in their bucket run in one SDPA
    call, each padded at its end to that length by repeating its last token. Causality keeps the real
    queries from ever seeing the padded keys, and the padded queries' outputs are dropped, so the result
    is exact (their gradients are zero). Packed rows of similar documents (image grids with short
    captions) then cost one or two SDPA calls per layer instead of one per distinct length.
    """
    by_len: dict[int, list[int]] = {}
    for r, lens in enumerate(seq_lens):
        if sum(lens) > n:
            raise ValueError(f"row {r}: documents {lens} hold {sum(lens)} tokens, more than the row's {n}")
        start = r * n
        for length in lens:
            if length > 0:
                by_len.setdefault(length, []).append(start)
            start += length
    if all(sum(1 for length in lens if length > 0) <= 1 for lens in seq_lens):
        # At most one document per row, padding only after it: causal attention over the row is exact for
        # every real token (padding then attends to the document instead of giving zeros; it has no labels).
        return AttentionPlan(kind="causal")
    buckets: list[tuple[int, list[int], list[int]]] = []  # (padded length L, starts, lengths), longest first
    for length in sorted(by_len, reverse=True):
        starts = by_len[length]
        if buckets and length * (1 + PER_DOC_PAD) >= buckets[-1][0]:
            buckets[-1][1].extend(starts)
            buckets[-1][2].extend([length] * len(starts))
        else:
            buckets.append((length, list(starts), [length] * len(starts)))
    groups, pieces, real = [], [], []
    for padded, starts, lengths in reversed(buckets):  # shortest first
        offsets = torch.arange(padded)  # (L,)
        lens = torch.tensor(lengths)[:, None]  # (k, 1)
        groups.append((padded, len(starts)))
        pieces.append((torch.tensor(starts)[:, None] + offsets.minimum(lens - 1)).reshape(-1))  # (k*L,)
        real.append((offsets < lens).reshape(-1))  # (k*L,): False on the padded slots
    gather = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)  # (G,)
    real_slots = torch.cat(real) if real else torch.zeros(0, dtype=torch.bool)  # (G,)
    scatter = torch.full((len(seq_lens) * n,), gather.numel(), dtype=torch.long)  # row padding -> zero row
    scatter[gather[real_slots]] = torch.arange(gather.numel())[real_slots]
    return AttentionPlan(kind="per_doc", gather=gather.to(device), scatter=scatter.to(device), groups=groups)


def _flex_plan(doc_ids: torch.Tensor) -> AttentionPlan:
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        same = (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (doc_ids[b, q_idx] >= 0)
        return (same & (q_idx >= kv_idx)) | (q_idx == kv_idx)

    b, n = doc_ids.shape
    block_mask = create_block_mask(mask_mod, b, None, n, n, device=doc_ids.device)
    return AttentionPlan(kind="flex", block_mask=block_mask)


_COMPILED_FLEX = None


def _flex_attention(compiled: bool):
    """flex_attention, compiled on GPU (eager flex materialises the full score matrix); eager on CPU."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _COMPILED_FLEX is None:  # pragma: no cover - GPU only
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX  # pragma: no cover


def _varlen_plan(seq_lens: list[list[int]], n: int, device: torch.device) -> AttentionPlan:
    """Documents of all rows as one varlen batch; each row's padding is one more (ignored) segment."""
    lens: list[int] = []
    for row in seq_lens:
        lens.extend(length for length in row if length > 0)
        if n - sum(row) > 0:
            lens.append(n - sum(row))
    cu = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)  # (segments + 1,)
    return AttentionPlan(kind="varlen", cu_seqlens=cu.to(device), max_seqlen=max(lens))


def plan_attention(
    impl: str,
    batch: int,
    n: int,
    device: torch.device,
    *,
    doc_ids: torch.Tensor | None = None,
    seq_lens: list[list[int]] | None = None,
    attention_mask: torch.Tensor | None = None,
    past_len: int = 0,
    cached: bool = False,
) -> AttentionPlan:
    """Choose how to attend for ``n`` new tokens per row.

    * ``cached``: generation with a KV cache holding ``past_len`` tokens; ``attention_mask (b, past_len + n)``
      marks real tokens (None = all real).
    * ``attention_mask`` without a cache: left-padded rows, a dense causal ∧ key-padding mask.
    * ``doc_ids (b, n)`` / ``seq_lens``: packed rows, attended with ``impl``.
    * none of them: plain causal attention.
    """
    if (doc_ids is not None or seq_lens is not None) and (attention_mask is not None or cached):
        raise ValueError(
            "packed rows (doc_ids / seq_lens) cannot be combined with attention_mask or a KV cache"
        )
    if cached:
        if attention_mask is not None:
            if attention_mask.shape != (batch, past_len + n):
                raise ValueError(
                    f"attention_mask must be (b, past + n) = {(batch, past_len + n)}, got "
                    f"{tuple(attention_mask.shape)}"
                )
            return AttentionPlan(kind="cached", mask=padding_causal_mask(attention_mask, n))
        if n == 1:
            return AttentionPlan(kind="cached")  # one new token sees every cached key
        if past_len == 0:
            return AttentionPlan(kind="cached", is_causal=True)
        full = torch.ones(batch, past_len + n, dtype=torch.bool, device=device)
        return AttentionPlan(kind="cached", mask=padding_causal_mask(full, n))
    if attention_mask is not None:
        if attention_mask.shape != (batch, n):
            raise ValueError(
                f"attention_mask must be (b, n) = {(batch, n)}, got {tuple(attention_mask.shape)}"
            )
        return AttentionPlan(kind="dense", mask=padding_causal_mask(attention_mask, n))
    if doc_ids is None and seq_lens is None:
        return AttentionPlan(kind="causal")
    if seq_lens is not None and len(seq_lens) != batch:
        raise ValueError(f"seq_lens has {len(seq_lens)} rows, input_ids has {batch}")
    if doc_ids is not None and doc_ids.shape != (batch, n):
        raise ValueError(f"doc_ids must be (b, n) = {(batch, n)}, got {tuple(doc_ids.shape)}")
    if impl == "sdpa_per_doc":
        if seq_lens is None:
            seq_lens = seq_lens_from_doc_ids(doc_ids)
        return _per_doc_plan(seq_lens, n, device)
    if impl == "flash_varlen":
        if flash_attn_varlen_func is None:
            raise RuntimeError("attn_impl='flash_varlen' needs the flash-attn package (GPU)")
        if seq_lens is None:
            seq_lens = seq_lens_from_doc_ids(doc_ids)
        return _varlen_plan(seq_lens, n, device)
    if doc_ids is None:
        doc_ids = doc_ids_from_seq_lens(seq_lens, n, device)
    if impl == "flex":
        return _flex_plan(doc_ids)
    if impl == "sdpa_dense_mask":
        return AttentionPlan(kind="dense", mask=block_causal_mask(doc_ids))
    raise ValueError(f"unknown attn_impl {impl!r}")


# ----------------------------------------------------------------------------- attend
def _attend_per_doc(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    b, h, n, d = q.shape
    h_kv = k.shape[1]

    def tokens(x: torch.Tensor, heads: int) -> torch.Tensor:
        # (b, heads, n, d) -> (b, n, heads, d) -> (b*n, heads, d) -> (G, heads, d): document slots, bucketed
        return x.transpose(1, 2).reshape(b * n, heads, d).index_select(0, plan.gather)

    qt, kt, vt = tokens(q, h), tokens(k, h_kv), tokens(v, h_kv)
    outs, start = [], 0
    for length, count in plan.groups:
        stop = start + length * count
        # (k*L, heads, d) -> (k, L, heads, d) -> (k, heads, L, d): one batch row per document
        qd, kd, vd = (x[start:stop].view(count, length, x.shape[1], d).transpose(1, 2) for x in (qt, kt, vt))
        o = sdpa(qd, kd, vd, is_causal=True)  # (k, h, L, d)
        outs.append(o.transpose(1, 2).reshape(length * count, h, d))  # (k*L, h, d)
        start = stop
    outs.append(q.new_zeros(1, h, d))  # the output of every padding token
    out = torch.cat(outs).index_select(0, plan.scatter)  # (G + 1, h, d) -> (b*n, h, d)
    return out.view(b, n, h, d).transpose(1, 2)  # (b, h, n, d)


def _attend_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    b, h, n, d = q.shape
    h_kv = k.shape[1]
    out = flash_attn_varlen_func(  # pragma: no cover - GPU only
        q.transpose(1, 2).reshape(b * n, h, d),  # (b*n, h, d)
        k.transpose(1, 2).reshape(b * n, h_kv, d),  # (b*n, h_kv, d)
        v.transpose(1, 2).reshape(b * n, h_kv, d),
        plan.cu_seqlens,
        plan.cu_seqlens,
        plan.max_seqlen,
        plan.max_seqlen,
        causal=True,
    )
    return out.view(b, n, h, d).transpose(1, 2)  # pragma: no cover - (b*n, h, d) -> (b, h, n, d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Attention output ``(b, h, n, d)`` for ``q (b, h, n, d)``, ``k, v (b, h_kv, m, d)`` under ``plan``."""
    if plan.kind == "causal":
        return sdpa(q, k, v, is_causal=True)
    if plan.kind in ("dense", "cached"):
        return sdpa(q, k, v, mask=plan.mask, is_causal=plan.is_causal)
    if plan.kind == "per_doc":
        return _attend_per_doc(q, k, v, plan)
    if plan.kind == "flex":
        return _flex_attention(q.is_cuda)(
            q, k, v, block_mask=plan.block_mask, enable_gqa=k.shape[1] != q.shape[1]
        )
    if plan.kind == "varlen":
        return _attend_varlen(q, k, v, plan)
    raise ValueError(f"unknown attention plan {plan.kind!r}")


# ----------------------------------------------------------------------------- KV cache
class KVCache:
    """Per-layer keys and values ``(b, h_kv, capacity, d)``, preallocated, doubled when full.

    The model's forward writes the new tokens' keys and values of layer ``i`` with :meth:`update` and
    moves :attr:`length` on with :meth:`advance` after the last layer; :meth:`truncate` drops tokens
    from the end (a block that will be rerun, e.g. iterative unmasking).
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch, num_kv_heads, max(capacity, 1), head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0  # tokens stored (the same for every layer between forwards)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v (b, h_kv, q, d)`` after the cached tokens; return all ``(b, h_kv, length + q, d)``."""
        end = self.length + k.shape[2]
        capacity = self.keys[layer].shape[2]
        if end > capacity:  # grow geometrically: amortised O(1) per token
            pad = (0, 0, 0, max(end, 2 * capacity) - capacity)  # extend dim 2 (tokens)
            self.keys[layer] = F.pad(self.keys[layer], pad)
            self.values[layer] = F.pad(self.values[layer], pad)
        keys, values = self.keys[layer], self.values[layer]
        keys.narrow(2, self.length, k.shape[2]).copy_(k)  # narrow: one cheap view per write (decode hot path)
        values.narrow(2, self.length, v.shape[2]).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        """Mark ``n`` more tokens as stored (called by the model after its last layer)."""
        self.length += n

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens; later writes overwrite the rest."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    def get_seq_length(self) -> int:
        """Tokens stored (the name transformers uses)."""
        return self.length
