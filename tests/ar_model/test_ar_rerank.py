"""Self-reranking (``ar_model.rerank``): the caption score is the mean log-probability of the caption's
labels after the image, read from packed image→caption documents.

Reference numerics: the packed scores equal a per-document forward of the whole causal LM (log-softmax
over the full vocabulary at every caption label), for plain codes, grouped codes and continuous
latents, and do not depend on how documents are cut into rows.
"""

from __future__ import annotations

import pytest
import torch

from ar_model.code_groups import group_codes
from ar_model.config import MMDecoderConfig, vocab_layout
from ar_model.modeling import MMDecoderForCausalLM
from ar_model.packing import IGNORE_INDEX
from ar_model.rerank import best_candidates, caption_scores
from ar_model.sequence import build_sequence, image_to_text_document
from ar_model.text_tokenizer import TextTokenizer

K = 12  # codebook size
CAPTIONS = ["a red circle", "two blue stars above a green square", "", "three yellow diamonds"]
SIZES = [(2, 2), (4, 2), (2, 4), (4, 4)]


def _model(tok: TextTokenizer, kind: str) -> MMDecoderForCausalLM:
    kw = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, initializer_range=0.1)
    codes = K
    if kind == "grouped":
        kw["code_group"] = 2
    elif kind == "continuous":
        kw |= dict(latent_dim=3, diffusion_head={"width": 16, "depth": 1, "frequency_dim": 8})
        codes = 1
    torch.manual_seed(0)
    return MMDecoderForCausalLM(MMDecoderConfig(**{**vocab_layout(tok, codes), **kw})).eval()


def _images(kind: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = []
    for h, w in SIZES:
        if kind == "continuous":
            out.append(torch.randn(h, w, 3, generator=g))  # (h, w, D)
        else:
            codes = torch.randint(0, K, (h, w), generator=g)  # (h, w)
            grouped = group_codes(codes[None], 2)[0]  # (h/2, w/2, 4)
            out.append(grouped if kind == "grouped" else codes)
    return out


@torch.no_grad()
def _reference(model: MMDecoderForCausalLM, tok: TextTokenizer, image: torch.Tensor, caption: str) -> float:
    """One document alone through the full model: mean log p of the labels after <eoi>."""
    cfg = model.config
    image_id = cfg.group_token_id if cfg.code_group > 1 else cfg.latent_token_id if cfg.latent_dim else None
    seq = build_sequence(image_to_text_document(image, caption), tok, image_token_id=image_id)
    doc = seq.as_document()
    kw = {}
    if "latents" in doc:
        kw = {"latents": doc["latents"][None], "latent_mask": doc["latent_mask"][None]}
    if "code_groups" in doc:
        kw["code_groups"] = doc["code_groups"][None]
    logits = model(seq.input_ids[None], positions=seq.positions[None], **kw).logits[0]  # (n, V)
    logp = logits.float().log_softmax(-1)
    eoi = int((seq.input_ids == tok.eoi_id).nonzero()[0, 0])
    picks = [float(logp[i, seq.labels[i]]) for i in range(eoi, len(seq)) if seq.labels[i] != IGNORE_INDEX]
    assert len(picks) == len(tok.encode(caption)) + 1  # the caption's tokens and <eos>
    return sum(picks) / len(picks)


@pytest.mark.parametrize("kind", ["discrete", "grouped", "continuous"])
def test_packed_scores_equal_each_document_alone(text_tokenizer: TextTokenizer, kind: str) -> None:
    model = _model(text_tokenizer, kind)
    images = _images(kind)
    scores = caption_scores(model, text_tokenizer, images, CAPTIONS)
    expected = torch.tensor([_reference(model, text_tokenizer, im, c) for im, c in zip(images, CAPTIONS)])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    # one document per row, or all in one row: the same scores
    one_each = caption_scores(model, text_tokenizer, images, CAPTIONS, batch_tokens=1)
    torch.testing.assert_close(one_each, scores, atol=1e-5, rtol=0)
    assert len(set(scores.tolist())) == len(CAPTIONS)  # the scores tell the pairs apart


def test_the_score_depends_on_the_image_and_the_caption(text_tokenizer: TextTokenizer) -> None:
    model = _model(text_tokenizer, "discrete")
    a, b = _images("discrete")[:2]
    s = caption_scores(model, text_tokenizer, [a, b, a], ["a red circle", "a red circle", "a blue square"])
    assert s[0] != s[1] and s[0] != s[2]


def test_bad_input_is_a_clear_error(text_tokenizer: TextTokenizer) -> None:
    model = _model(text_tokenizer, "discrete")
    images = _images("discrete")
    with pytest.raises(ValueError, match="images for"):
        caption_scores(model, text_tokenizer, images, CAPTIONS[:2])
    with pytest.raises(ValueError, match="batch_tokens"):
        caption_scores(model, text_tokenizer, images, CAPTIONS, batch_tokens=0)


def test_best_candidates_picks_each_groups_maximum_and_the_first_on_ties() -> None:
    scores = torch.tensor([0.1, 0.5, 0.2, -1.0, -1.0, -2.0, 3.0, 3.0, 3.0])
    assert best_candidates(scores, 3).tolist() == [1, 3, 6]
    assert best_candidates(scores, 1).tolist() == list(range(9))
    with pytest.raises(ValueError, match="groups of 4"):
        best_candidates(scores, 4)
    with pytest.raises(ValueError, match="groups of 0"):
        best_candidates(scores, 0)
