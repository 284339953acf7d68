"""Bidirectional attention inside a continuous image (``image_attention="bidirectional"``, MAR-style).

Image tokens see their whole image block; everything else stays causal and within its document; the
flow targets are the masked image tokens, conditioned on their own hidden states. Packing stays exact.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ar_model.config import MMDecoderConfig, vocab_layout
from ar_model.flow_matching import flow_matching_loss
from ar_model.image_blocks import image_block_ids, sample_visible_latents
from ar_model.modeling import MMDecoderForCausalLM, output_cache
from ar_model.packing import build_packed_batch, pack_documents
from ar_model.sequence import build_sequence, text_to_image_document
from ar_model.text_tokenizer import TextTokenizer

_spec = importlib.util.spec_from_file_location(
    "flow_decoder", Path(__file__).with_name("test_ar_flow_decoder.py")
)
fd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fd)


def bidi_model(tok: TextTokenizer, **overrides) -> MMDecoderForCausalLM:
    return fd.continuous_model(tok, image_attention="bidirectional", **overrides)


def test_image_block_ids() -> None:
    ids = torch.tensor([[1, 9, 9, 2, 9, 5, 9, 9, 9, 0]])
    assert image_block_ids(ids, 9).tolist() == [[-1, 0, 0, -1, 1, -1, 2, 2, 2, -1]]
    segments = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 2, 2, -1]])  # a new segment starts a new block
    assert image_block_ids(ids, 9, segments).tolist() == [[-1, 0, 0, -1, 1, -1, 2, 3, 3, -1]]


def test_sample_visible_latents() -> None:
    blocks = torch.tensor([[-1, 0, 0, 0, 0, -1, 1, 1], [-1, -1, 0, 0, 0, 0, 0, 0]]).repeat(200, 1)  # (400, 8)
    a = sample_visible_latents(blocks, torch.Generator().manual_seed(0))
    assert torch.equal(a, sample_visible_latents(blocks, torch.Generator().manual_seed(0)))
    assert not (a & (blocks < 0)).any()  # only image tokens are visible
    frac = a[blocks >= 0].float().mean().item()
    assert 0.4 < frac < 0.6  # E[1 - r] = 1/2 for r ~ U(0, 1)
    high = sample_visible_latents(blocks, torch.Generator().manual_seed(0), min_ratio=0.9)
    assert high[blocks >= 0].float().mean() < 0.1


def test_config_image_attention(text_tokenizer: TextTokenizer) -> None:
    layout = vocab_layout(text_tokenizer, 1)
    assert MMDecoderConfig(**layout).image_attention == "causal"
    with pytest.raises(ValueError, match="latent_dim > 0"):
        MMDecoderConfig(**layout, image_attention="bidirectional")
    with pytest.raises(ValueError, match="image_attention"):
        MMDecoderConfig(**layout, latent_dim=4, image_attention="full")


def test_image_tokens_see_their_whole_image(text_tokenizer: TextTokenizer) -> None:
    image_id = None
    outs = {}
    for mode in ("causal", "bidirectional"):
        model = fd.continuous_model(text_tokenizer, image_attention=mode)
        image_id = model.config.latent_token_id
        hidden = []
        for seed in (0, 1):
            lat = fd._latents(3, 4, 0)
            lat[2, 3] = fd._latents(1, 1, seed)[0, 0]  # only the last latent differs
            segs = text_to_image_document("a red circle", lat) + [("text", "done")]
            seq = build_sequence(segs, text_tokenizer, image_token_id=image_id)
            with torch.no_grad():
                hidden.append(fd._alone(model, seq).last_hidden_state[0])
        outs[mode] = (hidden, seq)
    (c0, c1), seq = outs["causal"]
    (b0, b1), _ = outs["bidirectional"]
    start, last = seq.image_spans[0][0], seq.image_spans[0][0] + 11
    torch.testing.assert_close(c0[:last], c1[:last])  # causal: nothing before the changed latent moves
    torch.testing.assert_close(b0[:start], b1[:start])  # bidirectional: the text before the image is causal
    assert not torch.allclose(b0[start:last], b1[start:last])  # ... but the image sees its last token
    assert not torch.allclose(b0[last + 1 :], b1[last + 1 :])


@pytest.mark.parametrize("attn_impl", ["sdpa_per_doc", "sdpa_dense_mask"])
def test_bidirectional_packed_equals_per_document(text_tokenizer: TextTokenizer, attn_impl: str) -> None:
    model = bidi_model(text_tokenizer, attn_impl=attn_impl)
    seqs = fd._sequences(text_tokenizer, model)
    docs = fd._with_latents([s.as_document() for s in seqs])
    g = torch.Generator().manual_seed(5)
    for doc in docs:  # MAR: a random part of each image is masked (placeholder input, flow target)
        blocks = image_block_ids(doc["input_ids"][None], model.config.latent_token_id)
        doc["latent_mask"] = sample_visible_latents(blocks, g)[0]
    plan = pack_documents([len(s) for s in seqs], max(len(s) for s in seqs) + 6)
    assert plan.num_rows < len(seqs)
    batch = build_packed_batch(docs, plan, pad_id=text_tokenizer.pad_id)
    image_id = model.config.latent_token_id
    with torch.no_grad():
        packed = model(
            batch["input_ids"],
            positions=batch["positions"],
            doc_ids=batch.doc_ids,
            seq_lens=batch.seq_lens,
            labels=batch["labels"],
            latents=batch["latents"],
            latent_mask=batch["latent_mask"],
            flow_generator=torch.Generator().manual_seed(0),
        )
        conds, targets, logits = {}, {}, {}
        for i, seq in enumerate(seqs):
            doc = docs[i]
            alone = model(
                seq.input_ids[None],
                positions=seq.positions[None],
                latents=doc["latents"][None],
                latent_mask=doc["latent_mask"][None],
            )
            predict = (seq.input_ids == image_id) & ~doc["latent_mask"]  # (n,)
            conds[i], targets[i] = alone.last_hidden_state[0][predict], doc["latents"][predict]
            logits[i] = alone.logits[0]
        order = [doc for row in plan.rows for doc, _, _ in row]
        cond_u, target_u = torch.cat([conds[i] for i in order]), torch.cat([targets[i] for i in order])
        assert cond_u.shape[0] > 5
        unpacked = flow_matching_loss(
            model.diffusion_head,
            cond_u,
            target_u,
            model.config.flow_loss_config,
            torch.Generator().manual_seed(0),
        )
    torch.testing.assert_close(packed.flow_loss, unpacked.loss, atol=1e-5, rtol=1e-5)
    for r, row in enumerate(plan.rows):
        cursor = 0
        for doc, start, end in row:
            torch.testing.assert_close(
                packed.logits[r, cursor : cursor + end - start], logits[doc], atol=1e-5, rtol=1e-5
            )
            cursor += end - start


def test_bidirectional_cached_block_equals_one_forward(text_tokenizer: TextTokenizer) -> None:
    """Generation: the prefix through the KV cache, then the whole image block in one cached call."""
    model = bidi_model(text_tokenizer)
    seq = fd._sequences(text_tokenizer, model)[0]
    doc = seq.as_document()
    lat, mask = doc["latents"][None], doc["latent_mask"][None].clone()
    mask[0, seq.image_spans[0][0] + 5 :] = False  # the rest of the image is still masked
    start, h, w = seq.image_spans[0]
    stop = start + h * w
    with torch.no_grad():
        full = model(seq.input_ids[None], positions=seq.positions[None], latents=lat, latent_mask=mask)
        prefix = model(
            seq.input_ids[None, :start], positions=seq.positions[None, :start], use_cache=True,
            latents=lat[:, :start], latent_mask=mask[:, :start],
        )  # fmt: skip
        block = model(
            seq.input_ids[None, start:stop],
            positions=seq.positions[None, start:stop],
            past_key_values=output_cache(prefix),
            latents=lat[:, start:stop],
            latent_mask=mask[:, start:stop],
        )
    torch.testing.assert_close(
        block.last_hidden_state, full.last_hidden_state[:, start:stop], atol=1e-5, rtol=1e-5
    )
