"""Self-reranking: of several sampled images, keep the one whose caption the model itself finds likeliest.

The decoder is trained on both orders of every (caption, image) pair, so besides sampling an image after a
caption it can score a caption after an image. CogView (Ding et al. 2021, arXiv:2105.13290, "Self-reranking")
ranks text-to-image candidates by this Caption Score, the geometric mean of the caption's token
probabilities given the image,

    CapS(x, t) = ( prod_i p(t_i | t_<i, x) ) ** (1 / |t|),

and keeps the best of several samples. :func:`caption_scores` returns ``log CapS``, the mean log-probability
of the caption's tokens and of the ``<eos>`` that ends it, read from one teacher-forced forward pass over the
image→caption documents ``<bos> <boi> <h> <w> image <eoi> caption <eos>`` (exactly the training format).
For candidates of one caption the mean ranks as the sum would; the mean also compares captions of
different lengths.

Documents are packed back to back into rows of at most ``batch_tokens`` tokens (and the model's
``max_position``; attention stays within each document), and the LM head runs only at the scored positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ar_model.packing import IGNORE_INDEX, PackPlan, build_packed_batch
from ar_model.sequence import build_sequence, image_to_text_document
from ar_model.text_tokenizer import TextTokenizer

__all__ = ["best_candidates", "caption_scores"]


def _documents(
    model, text_tokenizer: TextTokenizer, images: Sequence[torch.Tensor], captions: Sequence[str]
) -> list[dict[str, torch.Tensor]]:
    """Per-token tensors of each image→caption document, with ``score``: the label positions to read."""
    cfg = model.config
    # grouped codes and latents sit at a placeholder id; plain codes have none (both properties None)
    image_token_id = cfg.group_token_id if cfg.group_token_id is not None else cfg.latent_token_id
    docs = []
    for image, caption in zip(images, captions, strict=True):
        seq = build_sequence(
            image_to_text_document(image, caption),
            text_tokenizer,
            scheme=cfg.rope_scheme,
            code_offset=cfg.code_offset,
            image_token_id=image_token_id,
            max_len=cfg.max_position,
        )
        doc = seq.as_document()
        ids, labels = doc["input_ids"], doc["labels"]
        eoi = int((ids == text_tokenizer.eoi_id).nonzero()[-1, 0])  # its label is the caption's first token
        after = torch.arange(ids.shape[0], device=ids.device) >= eoi
        doc["score"] = after & (labels != IGNORE_INDEX)  # (n,): caption tokens and <eos> as labels
        docs.append(doc)
    return docs


@torch.no_grad()
def caption_scores(
    model,
    text_tokenizer: TextTokenizer,
    images: torch.Tensor | Sequence[torch.Tensor],
    captions: Sequence[str],
    *,
    batch_tokens: int = 8192,
) -> torch.Tensor:
    """``log CapS`` per (image, caption) pair: FloatTensor ``(N,)``, higher is a better match.

    ``images`` are the decoder's own image tokens, ``N`` of them: codes ``(h, w)``, grouped codes
    ``(h, w, G)`` of a grouped-code model, or normalized latents ``(h, w, D)`` of a continuous one (as
    :func:`ar_model.sequence.build_sequence` takes them). ``model`` is an
    :class:`~ar_model.modeling.MMDecoderForCausalLM`; it is run in eval mode as it is.
    """
    images = list(images)
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images for {len(captions)} captions")
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    scores: list[torch.Tensor] = []
    docs = _documents(model, text_tokenizer, images, captions)
    row_tokens = min(batch_tokens, model.config.max_position)  # a row is one sequence to the model
    start = 0
    while start < len(docs):  # one packed row of whole documents, at most row_tokens (or one document)
        stop, total = start, 0
        while stop < len(docs) and (stop == start or total + len(docs[stop]["input_ids"]) <= row_tokens):
            total += len(docs[stop]["input_ids"])
            stop += 1
        scores.append(_score_row(model, docs[start:stop]))
        start = stop
    return torch.cat(scores) if scores else torch.zeros(0)


def _score_row(model, docs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean log-probability of each document's scored labels, the documents packed into one row."""
    lengths = [d["input_ids"].shape[0] for d in docs]
    plan = PackPlan(rows=[[(i, 0, n) for i, n in enumerate(lengths)]], max_len=sum(lengths), lengths=lengths)
    batch = build_packed_batch(docs, plan, pad_id=model.config.pad_id)
    t = batch.tensors
    device = model.device
    kwargs = {}
    if "latents" in t:
        kwargs = {"latents": t["latents"].to(device, model.dtype), "latent_mask": t["latent_mask"].to(device)}
    if "code_groups" in t:
        kwargs["code_groups"] = t["code_groups"].to(device)
    hidden = model.model(
        t["input_ids"].to(device),
        positions=t["positions"].to(device),
        doc_ids=batch.doc_ids.to(device),
        seq_lens=batch.seq_lens,
        **kwargs,
    ).last_hidden_state  # (1, n, c)
    scored = t["score"][0].to(device)  # (n,)
    logp = model.lm_head(hidden[0, scored]).float().log_softmax(dim=-1)  # (m, V)
    token_logp = logp.gather(-1, t["labels"][0].to(device)[scored][:, None])[:, 0]  # (m,)
    owner = batch.doc_ids[0].to(device)[scored]  # (m,): which document each scored label belongs to
    sums = torch.zeros(len(docs), device=device).index_add_(0, owner, token_logp)
    counts = torch.zeros(len(docs), device=device).index_add_(0, owner, torch.ones_like(token_logp))
    return (sums / counts).cpu()  # every document has at least its <eos> label


def best_of(tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The best candidate of each image: ``tokens (M, C, ...)`` and ``scores (M, C)`` → ``(M, ...)``
    (ties to the earliest, as :func:`best_candidates`)."""
    best = best_candidates(scores.flatten(), scores.shape[1]).to(tokens.device)  # (M,) into the M * C
    return tokens.flatten(0, 1)[best]  # (M * C, ...) -> (M, ...)


def best_candidates(scores: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """Indices into ``scores (M * num_candidates,)`` of the best candidate of each consecutive group.

    Ties go to the earliest candidate, so candidate 0 (the image plain sampling would give) wins them.
    """
    if num_candidates < 1 or scores.numel() % num_candidates:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {num_candidates}")
    groups = scores.view(-1, num_candidates)  # (M, C)
    best = groups.argmax(dim=1)  # (M,): the first maximum of each row
    return torch.arange(groups.shape[0], device=scores.device) * num_candidates + best
