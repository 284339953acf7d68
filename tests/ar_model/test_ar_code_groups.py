"""Grouped image codes (``code_group = g > 1``): g×g codes per decoder position.

Invariants: grouping is a lossless re-layout; the head's teacher-forced logits equal its slot-by-slot
sampling path; the loss is the mean cross-entropy over every predicted symbol (text and codes), packed
== unpacked; cached == uncached generation and captioning; save/load round-trips; bad input is an error.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ar_model.code_groups import CodeGroupHead, group_codes, ungroup_codes
from ar_model.config import MMDecoderConfig, vocab_layout
from ar_model.generation import generate_image_codes, generate_tokens
from ar_model.modeling import MMCausalLMOutput, MMDecoderForCausalLM
from ar_model.packing import IGNORE_INDEX, build_packed_batch, pack_documents
from ar_model.positions import multimodal_positions
from ar_model.sequence import Sequence, build_sequence, image_to_text_document, text_to_image_document
from ar_model.text_tokenizer import TextTokenizer

K, G = 12, 2  # codebook size, group side


def grouped_model(tok: TextTokenizer, seed: int = 0, **overrides) -> MMDecoderForCausalLM:
    kw = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, code_group=G, initializer_range=0.1)
    torch.manual_seed(seed)
    return MMDecoderForCausalLM(MMDecoderConfig(**{**vocab_layout(tok, K), **kw, **overrides})).eval()


def _codes(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, K, (h, w), generator=torch.Generator().manual_seed(seed))  # (h, w)


def _sequences(tok: TextTokenizer, model: MMDecoderForCausalLM) -> list[Sequence]:
    segs = [
        text_to_image_document("a red circle", group_codes(_codes(4, 6, 0), G)),
        image_to_text_document(group_codes(_codes(2, 2, 1), G), "two blue stars above a green square"),
        text_to_image_document("", group_codes(_codes(4, 4, 2), G)),
    ]
    image_id = model.config.group_token_id
    return [build_sequence(s, tok, image_token_id=image_id) for s in segs]


def test_grouping_is_a_lossless_block_layout() -> None:
    codes = torch.arange(2 * 4 * 6).view(2, 4, 6)
    groups = group_codes(codes, 2)  # (2, 2, 3, 4)
    assert groups.shape == (2, 2, 3, 4)
    assert groups[1, 1, 2].tolist() == codes[1, 2:4, 4:6].flatten().tolist()  # raster order inside a block
    assert torch.equal(ungroup_codes(groups, 2), codes)
    assert torch.equal(group_codes(codes, 1)[..., 0], codes)
    with pytest.raises(ValueError, match="does not split"):
        group_codes(codes, 4)
    with pytest.raises(ValueError, match="not 3x3"):
        ungroup_codes(groups, 3)


def test_head_teacher_forcing_equals_slot_by_slot() -> None:
    torch.manual_seed(0)
    head = CodeGroupHead(16, K, 4, 24, num_layers=2, num_heads=2)
    cond, codes = torch.randn(5, 16), torch.randint(0, K, (5, 4))
    logits = head(cond, codes)  # (5, 4, K)
    nll = torch.zeros(())
    for slot in range(4):
        step = head.slot_logits(cond, codes[:, :slot])  # (5, K)
        torch.testing.assert_close(step, logits[:, slot], atol=1e-5, rtol=1e-5)
        nll = nll - F.log_softmax(step, -1).gather(1, codes[:, slot : slot + 1]).sum()
    torch.testing.assert_close(head.loss(cond, codes), nll, atol=1e-4, rtol=1e-5)
    # slot s depends on the codes before it only
    changed = codes.clone()
    changed[:, 2] = (changed[:, 2] + 1) % K
    moved = head(cond, changed)
    torch.testing.assert_close(moved[:, :3], logits[:, :3])
    assert not torch.allclose(moved[:, 3], logits[:, 3])


def test_sequence_places_the_placeholder_and_ignores_its_labels(text_tokenizer: TextTokenizer) -> None:
    model = grouped_model(text_tokenizer)
    cfg = model.config
    assert cfg.vocab_size == cfg.code_offset + 1 and model.lm_head.out_features == cfg.code_offset + 1
    seq = _sequences(text_tokenizer, model)[0]
    doc = seq.as_document()
    image = seq.image_mask()
    assert int(image.sum()) == 2 * 3  # a 4x6 code grid is 2x3 positions
    assert bool((seq.input_ids[image] == cfg.group_token_id).all())
    assert torch.equal(doc["code_groups"][image], group_codes(_codes(4, 6, 0), G).reshape(6, 4))
    assert bool((doc["code_groups"][~image] == 0).all())
    # no LM label is a placeholder; <w> and the image positions (but the last) predict codes instead
    assert not bool((seq.labels == cfg.group_token_id).any())
    assert bool((seq.labels[:-1][image[1:]] == IGNORE_INDEX).all())
    assert seq.position_segments[1] == ("image", (2, 3))


def _forward(model: MMDecoderForCausalLM, seq: Sequence, **kw) -> MMCausalLMOutput:
    groups = seq.as_document()["code_groups"][None]  # (1, n, G)
    return model(seq.input_ids[None], positions=seq.positions[None], code_groups=groups, **kw)


@pytest.mark.parametrize("attn_impl", ["sdpa_per_doc", "sdpa_dense_mask"])
def test_loss_is_the_mean_over_symbols_and_packed_equals_unpacked(
    text_tokenizer: TextTokenizer, attn_impl: str
) -> None:
    model = grouped_model(text_tokenizer, attn_impl=attn_impl)
    seqs = _sequences(text_tokenizer, model)
    total, count, code_total, code_count = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for seq in seqs:
            out = _forward(model, seq, labels=seq.labels[None])
            n_text = int((seq.labels != IGNORE_INDEX).sum())
            n_codes = int(seq.image_mask().sum()) * G * G
            # reference: text CE from the LM logits + the head's CE per code from the hidden states
            text = F.cross_entropy(out.logits[0], seq.labels, ignore_index=IGNORE_INDEX, reduction="sum")
            hidden = out.last_hidden_state[0]  # (n, c)
            nxt = seq.image_mask()[1:]
            codes = seq.as_document()["code_groups"][1:][nxt]  # (m, G*G)
            code = model.group_head.loss(hidden[:-1][nxt], codes)
            torch.testing.assert_close(out.loss, (text + code) / (n_text + n_codes), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.code_loss, code / n_codes, atol=1e-5, rtol=1e-5)
            total, count = total + float(text + code), count + n_text + n_codes
            code_total, code_count = code_total + float(code), code_count + n_codes
        docs = [s.as_document() for s in seqs]
        plan = pack_documents([len(s) for s in seqs], max(len(s) for s in seqs) + 12)
        assert plan.num_rows < len(seqs)
        batch = build_packed_batch(docs, plan, pad_id=text_tokenizer.pad_id)
        packed = model(
            batch["input_ids"],
            positions=batch["positions"],
            doc_ids=batch.doc_ids,
            seq_lens=batch.seq_lens,
            labels=batch["labels"],
            code_groups=batch["code_groups"],
        )
    torch.testing.assert_close(packed.loss, torch.tensor(total / count), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.code_loss, torch.tensor(code_total / code_count), atol=1e-5, rtol=1e-5)


def test_loss_trains_both_heads(text_tokenizer: TextTokenizer) -> None:
    model = grouped_model(text_tokenizer).train()
    seq = _sequences(text_tokenizer, model)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        out = _forward(model, seq, labels=seq.labels[None])
        opt.zero_grad()
        out.loss.backward()
        if first is None:
            first = float(out.code_loss.detach())
            grads = {n: p.grad for n, p in model.named_parameters()}
            assert grads["model.group_embed.weight"].abs().sum() > 0
            assert grads["group_head.out.weight"].abs().sum() > 0
            assert grads["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
        opt.step()
    assert float(out.code_loss.detach()) < 0.5 * first


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_cached_generation_equals_uncached(text_tokenizer: TextTokenizer, guidance_scale: float) -> None:
    model = grouped_model(text_tokenizer)
    prompts = [
        torch.tensor([text_tokenizer.bos_id, *text_tokenizer.encode(p)]) for p in ("a red circle", "two")
    ]
    runs = [
        generate_image_codes(
            model,
            prompts,
            4,
            6,
            guidance_scale=guidance_scale,
            cfg_schedule="linear",
            temperature=1.0,
            top_k=8,
            generator=[torch.Generator().manual_seed(i) for i in range(2)],
            use_cache=cache,
        )
        for cache in (True, False)
    ]
    assert runs[0].shape == (2, 4, 6) and runs[0].dtype == torch.long
    assert torch.equal(runs[0], runs[1])
    assert 0 <= int(runs[0].min()) and int(runs[0].max()) < K
    with pytest.raises(ValueError, match="does not split"):
        generate_image_codes(model, prompts, 3, 4)


def test_greedy_generation_follows_the_head(text_tokenizer: TextTokenizer) -> None:
    """Greedy codes are the argmax of the head, slot by slot, given the trunk at each position."""
    model = grouped_model(text_tokenizer)
    prompt = torch.tensor([text_tokenizer.bos_id, *text_tokenizer.encode("a red circle")])
    codes = generate_image_codes(model, [prompt], 2, 4, temperature=0.0)  # (1, 2, 4): 1x2 positions
    seq = build_sequence(text_to_image_document("a red circle", group_codes(codes[0], G)), text_tokenizer,
                         image_token_id=model.config.group_token_id)  # fmt: skip
    hidden = _forward(model, seq).last_hidden_state[0]  # (n, c)
    groups = group_codes(codes[0], G).reshape(2, G * G)
    start = seq.image_spans[0][0]
    logits = model.group_head(hidden[start - 1 : start + 1], groups)  # (2, G*G, K)
    assert torch.equal(logits.argmax(-1), groups)


def test_captioning_with_grouped_image_is_cached_equal(text_tokenizer: TextTokenizer) -> None:
    model = grouped_model(text_tokenizer)
    cfg, tok = model.config, text_tokenizer
    groups = group_codes(torch.stack([_codes(4, 4, 5), _codes(4, 4, 6)]), G).reshape(2, 4, G * G)  # (2, 4, G)
    ids = torch.tensor(
        [tok.bos_id, tok.boi_id, tok.h_token(2), tok.w_token(2), *[cfg.group_token_id] * 4, tok.eoi_id]
    )
    ids = ids.expand(2, -1)  # (2, 9)
    positions = multimodal_positions([("text", 4), ("image", (2, 2)), ("text", 1)], cfg.rope_scheme)
    side = torch.zeros(2, 9, G * G, dtype=torch.long)
    side[:, 4:8] = groups
    outs = [
        generate_tokens(model, ids, positions.expand(2, -1, -1), 6, temperature=1.0,
                        generator=torch.Generator().manual_seed(0), prompt_code_groups=side, use_cache=cache)
        for cache in (True, False)
    ]  # fmt: skip
    assert torch.equal(outs[0], outs[1])
    # the image is read: other codes change the captions' logits
    with torch.no_grad():
        a = model(ids, positions=positions.expand(2, -1, -1), code_groups=side).logits[:, -1]
        b = model(ids, positions=positions.expand(2, -1, -1), code_groups=(side + 1) % K).logits[:, -1]
    assert not torch.allclose(a, b)


def test_save_load_round_trip(text_tokenizer: TextTokenizer, tmp_path: Path) -> None:
    model = grouped_model(text_tokenizer)
    model.save_pretrained(tmp_path)
    loaded = MMDecoderForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.code_group == G and loaded.config.code_group_width == 64
    seq = _sequences(text_tokenizer, model)[1]
    with torch.no_grad():
        a, b = _forward(model, seq, labels=seq.labels[None]), _forward(loaded, seq, labels=seq.labels[None])
    assert torch.equal(a.loss, b.loss) and torch.equal(a.logits, b.logits)


def test_bad_input_is_an_error(text_tokenizer: TextTokenizer) -> None:
    model = grouped_model(text_tokenizer)
    seq = _sequences(text_tokenizer, model)[0]
    groups = seq.as_document()["code_groups"][None]
    with pytest.raises(ValueError, match="no code_groups"):
        model(seq.input_ids[None], positions=seq.positions[None])
    with pytest.raises(ValueError, match="outside"):
        model(seq.input_ids[None], positions=seq.positions[None], code_groups=groups + K)
    with pytest.raises(ValueError, match="must be long"):
        model(seq.input_ids[None], positions=seq.positions[None], code_groups=groups[..., :2])
    with pytest.raises(ValueError, match="latent_dim must be 0"):
        MMDecoderConfig(**vocab_layout(text_tokenizer, 1), code_group=2, latent_dim=4)
    ungrouped = MMDecoderForCausalLM(MMDecoderConfig(**vocab_layout(text_tokenizer, K), hidden_size=32))
    with pytest.raises(ValueError, match="does not group"):
        ungrouped(seq.input_ids[None], code_groups=groups)
    with pytest.raises(ValueError, match="all of one kind"):
        mixed = [("image", _codes(2, 2, 0)), ("image", group_codes(_codes(2, 2, 0), 2))]
        build_sequence(mixed, text_tokenizer, image_token_id=model.config.group_token_id)
