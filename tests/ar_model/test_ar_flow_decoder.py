"""Continuous tokens in the decoder: latent input, flow pairs, packed == unpacked, save/load, bad input.

A model with ``latent_dim > 0`` embeds latents with ``latent_proj`` and trains its diffusion head on the
hidden state before each latent; ``latent_dim = 0`` must leave the discrete model exactly as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from ar_model.attention import plan_attention
from ar_model.config import MMDecoderConfig, vocab_layout
from ar_model.flow_matching import flow_matching_loss
from ar_model.flow_sampler import sample_flow
from ar_model.modeling import MMCausalLMOutput, MMDecoderForCausalLM, output_cache
from ar_model.packing import IGNORE_INDEX, build_packed_batch, pack_documents
from ar_model.positions import SCHEMES
from ar_model.rope import rope_tables
from ar_model.sequence import Sequence, build_sequence, image_to_text_document, text_to_image_document
from ar_model.text_tokenizer import TextTokenizer

LATENT_DIM = 4
HEAD = {"width": 32, "depth": 2, "frequency_dim": 16}


def continuous_config(tok: TextTokenizer, **overrides) -> MMDecoderConfig:
    kw = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, initializer_range=0.05)
    kw |= dict(latent_dim=LATENT_DIM, diffusion_head=HEAD, flow_loss={"weight": 0.5})
    return MMDecoderConfig(**{**vocab_layout(tok, 1), **kw, **overrides})


def randomize_head(model: MMDecoderForCausalLM, seed: int = 0) -> MMDecoderForCausalLM:
    """Give the (zero-initialised) head random weights, so that it sees and passes gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_head.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def continuous_model(tok: TextTokenizer, seed: int = 0, **overrides) -> MMDecoderForCausalLM:
    torch.manual_seed(seed)
    return randomize_head(MMDecoderForCausalLM(continuous_config(tok, **overrides)), seed).eval()


def _latents(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randn(h, w, LATENT_DIM, generator=torch.Generator().manual_seed(seed))  # (h, w, D)


def _sequences(tok: TextTokenizer, model: MMDecoderForCausalLM, scheme: str = "rope_tv") -> list[Sequence]:
    """Caption→image, image→caption, text only, two images, an empty caption."""
    segs = [
        text_to_image_document("a red circle", _latents(3, 4, 0)),
        image_to_text_document(_latents(2, 2, 1), "two blue stars above a green square"),
        [("text", "a purple diamond on a black background")],
        [("text", "one"), ("image", _latents(2, 3, 2)), ("text", "and"), ("image", _latents(1, 2, 3))],
        text_to_image_document("", _latents(4, 2, 4)),
    ]
    image_id = model.config.latent_token_id
    return [build_sequence(s, tok, scheme=scheme, image_token_id=image_id) for s in segs]


def _alone(model: MMDecoderForCausalLM, seq: Sequence, **kw) -> MMCausalLMOutput:
    doc = seq.as_document()
    latents = doc.get("latents", torch.zeros(len(seq), LATENT_DIM))[None]  # (1, n, D)
    mask = doc.get("latent_mask", torch.zeros(len(seq), dtype=torch.bool))[None]  # (1, n)
    return model(seq.input_ids[None], positions=seq.positions[None], latents=latents, latent_mask=mask, **kw)


def _with_latents(docs: list[dict]) -> list[dict]:
    """Give text-only documents zero latents, so that every document has the same keys for packing."""
    out = []
    for doc in docs:
        n = doc["input_ids"].shape[0]
        out.append(
            {"latents": torch.zeros(n, LATENT_DIM), "latent_mask": torch.zeros(n, dtype=torch.bool), **doc}
        )
    return [{k: d[k] for k in out[0]} for d in out]


# ----------------------------------------------------------------------------- packing
@pytest.mark.parametrize("attn_impl", ["sdpa_per_doc", "sdpa_dense_mask"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_packed_flow_conditions_and_loss_equal_per_document(
    text_tokenizer: TextTokenizer, scheme: str, attn_impl: str
) -> None:
    model = continuous_model(text_tokenizer, rope_scheme=scheme, attn_impl=attn_impl)
    seqs = _sequences(text_tokenizer, model, scheme)
    docs = _with_latents([s.as_document() for s in seqs])
    plan = pack_documents([len(s) for s in seqs], max(len(s) for s in seqs) + 6)
    assert plan.num_rows < len(seqs) and plan.num_split == 0
    batch = build_packed_batch(docs, plan, pad_id=text_tokenizer.pad_id)
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
        cond_p, target_p = model.flow_pairs(
            packed.last_hidden_state, batch["latents"], batch["latent_mask"], batch.doc_ids, batch.seq_lens
        )
        conds, targets = {}, {}
        for i, seq in enumerate(seqs):
            alone = _alone(model, seq)
            doc = docs[i]
            conds[i], targets[i] = model.flow_pairs(
                alone.last_hidden_state, doc["latents"][None], doc["latent_mask"][None]
            )
            # one pair per latent: the first latent of an image is conditioned on <w_W>
            assert conds[i].shape[0] == int(doc["latent_mask"].sum())
        order = [doc for row in plan.rows for doc, _, _ in row]  # packed row-major document order
        cond_u = torch.cat([conds[i] for i in order])  # (N, c)
        target_u = torch.cat([targets[i] for i in order])  # (N, D)
        assert torch.equal(target_p, target_u) and target_p.shape[0] == 4 * 3 + 2 * 2 + 2 * 3 + 1 * 2 + 4 * 2
        torch.testing.assert_close(cond_p, cond_u, atol=1e-5, rtol=1e-5)
        unpacked = flow_matching_loss(
            model.diffusion_head,
            cond_u,
            target_u,
            model.config.flow_loss_config,
            torch.Generator().manual_seed(0),
        )
    torch.testing.assert_close(packed.flow_loss, unpacked.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.shortcut_loss, unpacked.shortcut, atol=1e-5, rtol=1e-5)
    assert packed.flow_loss > 0 and packed.shortcut_loss > 0
    torch.testing.assert_close(packed.loss, packed.text_loss + 0.5 * packed.flow_loss)


def test_flow_pairs_never_cross_documents() -> None:
    hidden = torch.arange(12.0).view(1, 6, 2)  # (1, 6, 2): position i has hidden (2i, 2i+1)
    latents = torch.arange(6.0).view(1, 6, 1)  # (1, 6, 1): position i has latent i
    mask = torch.tensor([[False, True, True, True, True, False]])  # documents [0, 3) and [3, 6)
    cond, target = MMDecoderForCausalLM.flow_pairs(hidden, latents, mask, seq_lens=[[3, 3]])
    assert target[:, 0].tolist() == [1, 2, 4]  # 3 is a document's first token: no pair 2 -> 3
    assert cond[:, 0].tolist() == [0, 2, 6]
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert MMDecoderForCausalLM.flow_pairs(hidden, latents, mask, doc_ids=doc_ids)[1][:, 0].tolist() == [
        1,
        2,
        4,
    ]
    # A split document: the same document id, but two chunks (seq_lens) must not be joined.
    same_doc = torch.zeros(1, 6, dtype=torch.long)
    pairs = MMDecoderForCausalLM.flow_pairs(hidden, latents, mask, doc_ids=same_doc, seq_lens=[[3, 3]])
    assert pairs[1][:, 0].tolist() == [1, 2, 4]
    assert MMDecoderForCausalLM.flow_pairs(hidden, latents, mask)[1][:, 0].tolist() == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- latent input
def test_latents_replace_the_placeholder_embedding(text_tokenizer: TextTokenizer) -> None:
    model = continuous_model(text_tokenizer)
    seq = _sequences(text_tokenizer, model)[0]
    doc = seq.as_document()
    emb = model.model.embed(seq.input_ids[None], doc["latents"][None], doc["latent_mask"][None])[0]  # (n, c)
    mask = doc["latent_mask"]
    torch.testing.assert_close(emb[mask], model.model.latent_proj(doc["latents"][mask]))
    torch.testing.assert_close(emb[~mask], model.model.embed_tokens(seq.input_ids[~mask]))
    assert model.model.latent_proj.bias is not None and not model.model.latent_proj.bias.any()  # zero init
    with torch.no_grad():  # the latents reach the output: different latents, different hidden states
        a = _alone(model, seq).last_hidden_state
        other = build_sequence(
            text_to_image_document("a red circle", _latents(3, 4, 9)),
            text_tokenizer,
            image_token_id=model.config.latent_token_id,
        )
        b = _alone(model, other).last_hidden_state
    first = seq.image_spans[0][0]
    torch.testing.assert_close(a[:, :first], b[:, :first])  # causal: the same before the first latent
    assert not torch.allclose(a[:, first:], b[:, first:])


def test_cached_steps_with_latents_equal_one_forward(text_tokenizer: TextTokenizer) -> None:
    """Generation feeds latents one at a time through the KV cache (module and lean paths)."""
    model = continuous_model(text_tokenizer)
    seq = _sequences(text_tokenizer, model)[0]
    doc = seq.as_document()
    lat, mask = doc["latents"][None], doc["latent_mask"][None]  # (1, n, D), (1, n)
    with torch.no_grad():
        full = _alone(model, seq).last_hidden_state  # (1, n, c)
        start = seq.image_spans[0][0]
        out = model(
            seq.input_ids[None, :start], positions=seq.positions[None, :start], use_cache=True,
            latents=lat[:, :start], latent_mask=mask[:, :start],
        )  # fmt: skip
        cache = output_cache(out)
        cos, sin = rope_tables(
            seq.positions[None], model.config.head_dim, model.config.rope_base, torch.float32
        )
        weights = model.model.plain_layer_weights()
        assert weights is not None
        for i in range(start, len(seq)):
            plan = plan_attention("sdpa_per_doc", 1, 1, lat.device, past_len=i, cached=True)
            step = model.model.run_layers(
                seq.input_ids[None, i : i + 1], cos[:, i : i + 1], sin[:, i : i + 1], plan, cache,
                weights=weights if i % 2 else None,  # alternate the lean and the module path
                latents=lat[:, i : i + 1], latent_mask=mask[:, i : i + 1],
            )  # fmt: skip
            torch.testing.assert_close(step[:, 0], full[:, i], atol=1e-5, rtol=1e-5)


def test_flow_loss_trains_the_trunk_and_decreases(text_tokenizer: TextTokenizer) -> None:
    model = continuous_model(text_tokenizer).train()
    seqs = _sequences(text_tokenizer, model)
    docs = _with_latents([s.as_document() for s in seqs])
    plan = pack_documents([len(s) for s in seqs], max(len(s) for s in seqs) + 6)
    batch = build_packed_batch(docs, plan, pad_id=text_tokenizer.pad_id)
    kw = dict(positions=batch["positions"], seq_lens=batch.seq_lens, latents=batch["latents"])
    kw |= dict(latent_mask=batch["latent_mask"])
    no_text = torch.full_like(batch["labels"], IGNORE_INDEX)
    out = model(batch["input_ids"], labels=no_text, flow_generator=torch.Generator().manual_seed(0), **kw)
    assert out.text_loss.item() == 0.0 and out.loss > 0
    out.loss.backward()
    for name in (
        "model.latent_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "diffusion_head.cond_proj.weight",
    ):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert model.lm_head.weight.grad is None or not model.lm_head.weight.grad.any()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        out = model(
            batch["input_ids"],
            labels=batch["labels"],
            flow_generator=torch.Generator().manual_seed(step),
            **kw,
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append((out.text_loss.item(), out.flow_loss.item()))
    assert sum(t for t, _ in losses[-5:]) < 0.7 * sum(t for t, _ in losses[:5])
    assert sum(f for _, f in losses[-5:]) < 0.9 * sum(f for _, f in losses[:5])


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip_with_head(text_tokenizer: TextTokenizer, tmp_path: Path) -> None:
    model = continuous_model(text_tokenizer, seed=3)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["latent_dim"] == LATENT_DIM and saved["diffusion_head"]["width"] == HEAD["width"]
    assert saved["flow_loss"]["weight"] == 0.5
    state = load_file(tmp_path / "model.safetensors")
    assert "model.latent_proj.weight" in state and "diffusion_head.final.out_proj.weight" in state
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MMDecoderForCausalLM)
    assert loaded.config.to_dict() == model.config.to_dict() | {"_name_or_path": str(tmp_path)}
    assert loaded.config.head_config == model.config.head_config
    seq = _sequences(text_tokenizer, model)[3]
    with torch.no_grad():
        a = _alone(model, seq, labels=seq.labels[None], flow_generator=torch.Generator().manual_seed(1))
        b = _alone(loaded, seq, labels=seq.labels[None], flow_generator=torch.Generator().manual_seed(1))
    assert (
        torch.equal(a.logits, b.logits)
        and torch.equal(a.loss, b.loss)
        and torch.equal(a.flow_loss, b.flow_loss)
    )
    cond = a.last_hidden_state[0, :3]
    sa = sample_flow(model.diffusion_head, cond, 2, generator=torch.Generator().manual_seed(2))
    sb = sample_flow(loaded.diffusion_head, cond, 2, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sa, sb)


def test_latent_dim_mismatch_at_load_is_an_error(text_tokenizer: TextTokenizer, tmp_path: Path) -> None:
    continuous_model(text_tokenizer).save_pretrained(tmp_path)
    with pytest.raises((RuntimeError, ValueError), match="(?i)size|shape|mismatch"):
        MMDecoderForCausalLM.from_pretrained(tmp_path, latent_dim=LATENT_DIM + 2)


# ----------------------------------------------------------------------------- discrete models unchanged
def test_discrete_model_is_unchanged(text_tokenizer: TextTokenizer, tmp_path: Path) -> None:
    kw = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    model = MMDecoderForCausalLM(MMDecoderConfig(**vocab_layout(text_tokenizer, 64), **kw))
    layer = [
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.{i}.{name}" for i in range(2) for name in layer}
    assert set(model.state_dict()) == expected
    assert model.diffusion_head is None and model.model.latent_proj is None
    assert (
        model.config.latent_dim == 0
        and model.config.diffusion_head is None
        and model.config.head_config is None
    )
    ids = torch.tensor([[1, 5, 6, 7]])
    out = model(ids, labels=ids)
    assert type(out) is CausalLMOutputWithPast
    # A config.json written before continuous tokens existed (no latent keys) still loads.
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("latent_dim", "diffusion_head", "flow_loss"):
        cfg.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = MMDecoderForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.latent_dim == 0 and set(loaded.state_dict()) == expected


def test_config_checks_latent_fields(text_tokenizer: TextTokenizer) -> None:
    layout = vocab_layout(text_tokenizer, 1)
    with pytest.raises(ValueError, match="latent_dim > 0"):
        MMDecoderConfig(**layout, diffusion_head={"width": 8})
    with pytest.raises(ValueError, match="latent_dim"):
        MMDecoderConfig(**layout, latent_dim=-1)
    with pytest.raises(ValueError, match="unknown key"):
        MMDecoderConfig(**layout, latent_dim=4, diffusion_head={"widht": 8})
    with pytest.raises(ValueError, match="shortcut"):
        MMDecoderConfig(**layout, latent_dim=4, diffusion_head={"shortcut_levels": 0})
    cfg = MMDecoderConfig(
        **layout, latent_dim=4, diffusion_head={"shortcut_levels": 0}, flow_loss={"shortcut_fraction": 0}
    )
    assert cfg.head_config.shortcut_levels == 0 and cfg.flow_loss_config.samples_per_position == 4
    assert cfg.latent_token_id == cfg.code_offset
    cfg.check_latent_dim(4)
    for wrong in (3, None):
        with pytest.raises(ValueError, match="latent dimension mismatch"):
            cfg.check_latent_dim(wrong)
    MMDecoderConfig(**layout).check_latent_dim(None)  # discrete decoder, discrete tokenizer
    with pytest.raises(ValueError, match="latent dimension mismatch"):
        MMDecoderConfig(**layout).check_latent_dim(4)


# ----------------------------------------------------------------------------- bad input
def test_bad_latents_are_errors(text_tokenizer: TextTokenizer) -> None:
    model = continuous_model(text_tokenizer)
    seq = _sequences(text_tokenizer, model)[0]
    doc = seq.as_document()
    ids, lat, mask = seq.input_ids[None], doc["latents"][None], doc["latent_mask"][None]
    for bad_value in (float("nan"), float("inf")):
        bad = lat.clone()
        bad[0, seq.image_spans[0][0] + 1, 2] = bad_value
        with pytest.raises(ValueError, match="NaN or inf"):
            model(ids, latents=bad, latent_mask=mask)
    with pytest.raises(ValueError, match="does not match the model's latent_dim"):
        model(ids, latents=torch.zeros(1, ids.shape[1], LATENT_DIM + 1), latent_mask=mask)
    with pytest.raises(ValueError, match="go together"):
        model(ids, latents=lat)
    with pytest.raises(ValueError, match="latent_mask must be bool"):
        model(ids, latents=lat, latent_mask=mask.long())
    discrete = MMDecoderForCausalLM(
        MMDecoderConfig(**vocab_layout(text_tokenizer, 8), hidden_size=16, num_layers=1)
    )
    with pytest.raises(ValueError, match="discrete"):
        discrete(ids, latents=lat, latent_mask=mask)


# ----------------------------------------------------------------------------- precision and checkpointing
def _packed(tok: TextTokenizer, model: MMDecoderForCausalLM) -> dict:
    seqs = _sequences(tok, model)
    docs = _with_latents([s.as_document() for s in seqs])
    batch = build_packed_batch(docs, pack_documents([len(s) for s in seqs], 64), pad_id=tok.pad_id)
    return dict(
        input_ids=batch["input_ids"],
        positions=batch["positions"],
        seq_lens=batch.seq_lens,
        labels=batch["labels"],
        latents=batch["latents"],
        latent_mask=batch["latent_mask"],
    )


def test_flow_loss_is_fp32_under_bf16(text_tokenizer: TextTokenizer) -> None:
    model = continuous_model(text_tokenizer)
    batch = _packed(text_tokenizer, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, flow_generator=torch.Generator().manual_seed(0))
    assert out.flow_loss.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.latent_proj.weight.grad is not None
    bf16 = continuous_model(text_tokenizer).to(torch.bfloat16)  # bf16 weights, fp32 latents
    out = bf16(**batch, flow_generator=torch.Generator().manual_seed(0))
    assert out.flow_loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_gradient_checkpointing_with_latents(text_tokenizer: TextTokenizer) -> None:
    grads = []
    for ckpt in (False, True):
        model = continuous_model(text_tokenizer, gradient_checkpointing=ckpt).train()
        out = model(**_packed(text_tokenizer, model), flow_generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        grads.append((out.loss.detach(), model.model.latent_proj.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
