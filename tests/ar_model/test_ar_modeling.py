"""The decoder: packed == per-document logits, RoPE schemes, gradients, save/load, config, presets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from ar_model.config import MMDecoderConfig, vocab_layout
from ar_model.modeling import MMDecoderForCausalLM
from ar_model.packing import IGNORE_INDEX, build_packed_batch, join_rows, pack_documents
from ar_model.positions import SCHEMES, multimodal_positions
from ar_model.presets import PRESETS, count_parameters, preset_config
from ar_model.sequence import build_sequence, image_to_text_document, text_to_image_document
from ar_model.text_tokenizer import TextTokenizer

NUM_CODES = 64


def tiny_config(tok: TextTokenizer | None = None, **overrides) -> MMDecoderConfig:
    vocab = (
        vocab_layout(tok, NUM_CODES)
        if tok is not None
        else dict(text_vocab_size=100, num_image_codes=NUM_CODES, max_image_side=8)
    )
    kw = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, initializer_range=0.05)
    return MMDecoderConfig(**{**vocab, **kw, **overrides})


def tiny_model(tok: TextTokenizer | None = None, seed: int = 0, **overrides) -> MMDecoderForCausalLM:
    torch.manual_seed(seed)
    return MMDecoderForCausalLM(tiny_config(tok, **overrides)).eval()


def _codes(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, NUM_CODES, (h, w), generator=torch.Generator().manual_seed(seed))


def _documents(tok: TextTokenizer, scheme: str) -> list:
    """Mixed documents: caption→image, image→caption, text only, two images, an empty caption."""
    segs = [
        text_to_image_document("a red circle", _codes(3, 4, 0)),
        image_to_text_document(_codes(2, 2, 1), "two blue stars above a green square"),
        [("text", "a purple diamond on a black background")],
        [("text", "one"), ("image", _codes(2, 3, 2)), ("text", "and"), ("image", _codes(1, 2, 3))],
        text_to_image_document("", _codes(4, 2, 4)),
        text_to_image_document("three cyan crosses", _codes(2, 5, 5)),
    ]
    return [build_sequence(s, tok, scheme=scheme) for s in segs]


# ----------------------------------------------------------------------------- packing
@pytest.mark.parametrize("attn_impl", ["sdpa_per_doc", "sdpa_dense_mask"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_packed_logits_equal_per_document(text_tokenizer: TextTokenizer, scheme: str, attn_impl: str) -> None:
    model = tiny_model(text_tokenizer, rope_scheme=scheme, attn_impl=attn_impl)
    seqs = _documents(text_tokenizer, scheme)
    docs = [s.as_document() for s in seqs]
    max_len = max(len(s) for s in seqs) + 6
    plan = pack_documents([len(s) for s in seqs], max_len)
    assert plan.num_rows < len(seqs) and plan.num_split == 0  # real packing, nothing split
    batch = build_packed_batch(docs, plan, pad_id=text_tokenizer.pad_id)
    assert (batch.doc_ids < 0).any()  # some padding at the end of a row
    with torch.no_grad():
        packed = model(
            batch["input_ids"],
            positions=batch["positions"],
            doc_ids=batch.doc_ids,
            seq_lens=batch.seq_lens,
            labels=batch["labels"],
        )
        assert torch.isfinite(packed.logits).all()
        total, count = 0.0, 0
        for i, seq in enumerate(seqs):
            alone = model(seq.input_ids[None], positions=seq.positions[None], labels=seq.labels[None])
            torch.testing.assert_close(packed.logits[batch.doc_ids == i], alone.logits[0], atol=1e-5, rtol=0)
            n_labels = int((seq.labels != IGNORE_INDEX).sum())
            total, count = total + alone.loss.item() * n_labels, count + n_labels
    torch.testing.assert_close(packed.loss.item(), total / count, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn_impl", ["sdpa_per_doc", "sdpa_dense_mask"])
def test_joined_rows_give_the_packed_loss_and_gradients(
    text_tokenizer: TextTokenizer, attn_impl: str
) -> None:
    """Training on ``join_rows(batch)`` (the rows' real tokens in one row, no padding) is the same
    computation as on the packed rows: the same loss, per-document logits and gradients."""
    seqs = _documents(text_tokenizer, "rope_tv")
    plan = pack_documents([len(s) for s in seqs], max(len(s) for s in seqs) + 6)
    batch = build_packed_batch([s.as_document() for s in seqs], plan, pad_id=text_tokenizer.pad_id)
    joined = join_rows(batch, 4096, text_tokenizer.pad_id)
    assert batch.num_rows > 1 and joined.num_rows == 1 and not (joined.doc_ids < 0).any()
    results = []
    for b in (batch, joined):
        model = tiny_model(text_tokenizer, attn_impl=attn_impl).train()
        out = model(
            b["input_ids"],
            positions=b["positions"],
            doc_ids=b.doc_ids,
            seq_lens=b.seq_lens,
            labels=b["labels"],
        )
        out.loss.backward()
        per_doc = {i: out.logits[b.doc_ids == i].detach() for i in range(len(seqs))}
        results.append((out.loss.detach(), per_doc, {k: p.grad for k, p in model.named_parameters()}))
    (loss_a, logits_a, grads_a), (loss_b, logits_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    for i in logits_a:
        torch.testing.assert_close(logits_b[i], logits_a[i], atol=1e-5, rtol=0)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], atol=1e-6, rtol=1e-5, msg=k)


def test_doc_ids_or_seq_lens_alone_give_the_same_logits(text_tokenizer: TextTokenizer) -> None:
    model = tiny_model(text_tokenizer)
    seqs = _documents(text_tokenizer, "rope_tv")
    plan = pack_documents([len(s) for s in seqs], 64)
    batch = build_packed_batch([s.as_document() for s in seqs], plan)
    args = (batch["input_ids"], batch["positions"])
    with torch.no_grad():
        both = model(*args, doc_ids=batch.doc_ids, seq_lens=batch.seq_lens).logits
        ids_only = model(*args, doc_ids=batch.doc_ids).logits
        lens_only = model(*args, seq_lens=batch.seq_lens).logits
    assert torch.equal(both, ids_only) and torch.equal(both, lens_only)


def test_text_only_rope_tv_equals_flat() -> None:
    """Text at (n, n) is rotated like 1-D RoPE, so rope_tv and flat give the same logits for text."""
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    logits = {}
    for scheme in ("rope_tv", "flat", "mrope"):
        model = tiny_model(rope_scheme=scheme)
        pos = multimodal_positions([("text", 20)], scheme).expand(2, 20, 2)  # (b, n, 2)
        with torch.no_grad():
            logits[scheme] = model(ids, positions=pos).logits
    assert torch.equal(logits["rope_tv"], logits["flat"]) and torch.equal(logits["mrope"], logits["flat"])


def test_positions_matter_for_images(text_tokenizer: TextTokenizer) -> None:
    """The same image document gets different logits under rope_tv and flat (positions reach attention)."""
    model = tiny_model(text_tokenizer)
    out = {}
    for scheme in ("rope_tv", "flat"):
        seq = build_sequence(
            text_to_image_document("a red star", _codes(3, 3, 0)), text_tokenizer, scheme=scheme
        )
        with torch.no_grad():
            out[scheme] = model(seq.input_ids[None], positions=seq.positions[None]).logits
    assert not torch.allclose(out["rope_tv"], out["flat"], atol=1e-4)


# ----------------------------------------------------------------------------- gradients
def test_loss_decreases_on_a_tiny_batch(text_tokenizer: TextTokenizer) -> None:
    model = tiny_model(text_tokenizer, hidden_size=48, num_heads=4, num_kv_heads=4).train()
    seqs = _documents(text_tokenizer, "rope_tv")
    batch = build_packed_batch([s.as_document() for s in seqs], pack_documents([len(s) for s in seqs], 64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(
            batch["input_ids"], batch["positions"], seq_lens=batch.seq_lens, labels=batch["labels"]
        ).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses[::8]


@pytest.mark.parametrize("attn_impl", ["sdpa_per_doc", "sdpa_dense_mask"])
def test_gradient_checkpointing_gives_the_same_gradients(
    text_tokenizer: TextTokenizer, attn_impl: str
) -> None:
    seqs = _documents(text_tokenizer, "rope_tv")
    batch = build_packed_batch([s.as_document() for s in seqs], pack_documents([len(s) for s in seqs], 64))
    grads = []
    for flag in (False, True):
        model = tiny_model(text_tokenizer, gradient_checkpointing=flag, attn_impl=attn_impl).train()
        assert model.model.gradient_checkpointing is flag
        loss = model(
            batch["input_ids"], batch["positions"], doc_ids=batch.doc_ids, labels=batch["labels"]
        ).loss
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-7, rtol=1e-5, msg=k)
        assert grads[0][k].abs().sum() > 0, k  # every parameter gets a gradient


def test_transformers_checkpointing_switch_is_honoured() -> None:
    model = tiny_model()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert model.model.gradient_checkpointing
    ids = torch.randint(0, 100, (1, 12))
    model(ids, labels=ids).loss.backward()  # runs through torch.utils.checkpoint


# ----------------------------------------------------------------------------- init
def test_explicit_init() -> None:
    model = tiny_model(hidden_size=64, num_layers=8, initializer_range=0.02)
    layer = model.model.layers[0]
    std = lambda p: p.detach().std().item()  # noqa: E731
    assert std(layer.self_attn.q_proj.weight) == pytest.approx(0.02, rel=0.1)
    assert std(model.model.embed_tokens.weight) == pytest.approx(0.02, rel=0.1)
    assert std(layer.mlp.down_proj.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert std(layer.self_attn.o_proj.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.15)
    assert torch.equal(layer.self_attn.q_norm.weight, torch.ones(16))
    assert torch.equal(model.model.norm.weight, torch.ones(64))


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("tied", [False, True])
def test_save_from_pretrained_round_trip_is_bitwise(tmp_path: Path, tied: bool) -> None:
    model = tiny_model(tie_embeddings=tied)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mm_decoder"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is MMDecoderForCausalLM
    assert type(AutoConfig.from_pretrained(tmp_path)) is MMDecoderConfig
    assert loaded.config.to_dict() == model.config.to_dict() | {"_name_or_path": str(tmp_path)}
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tied
    ids = torch.randint(0, 164, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)


def test_from_pretrained_initializes_missing_weights(tmp_path: Path) -> None:
    """transformers 5 builds on the meta device; weights missing from the file must be really initialized."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = [k for k in weights if k.endswith(("q_norm.weight", "k_norm.weight"))]
    dropped.append("model.layers.1.mlp.up_proj.weight")
    save_file({k: v for k, v in weights.items() if k not in dropped}, tmp_path / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    state = loaded.state_dict()
    for k in dropped:
        if "norm" in k:
            assert torch.equal(state[k], torch.ones_like(state[k])), k
    up = state["model.layers.1.mlp.up_proj.weight"]
    assert torch.isfinite(up).all() and up.std().item() == pytest.approx(0.05, rel=0.2)
    kept = [k for k in weights if k not in dropped]
    assert all(torch.equal(state[k], weights[k]) for k in kept)


# ----------------------------------------------------------------------------- config
def test_unknown_config_keys_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown key"):
        MMDecoderConfig(hidden_size=32, num_heads=4, rope_shceme="flat")
    tiny_config().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layer": 3}))
    with pytest.raises(ValueError, match="num_hidden_layer"):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
        (dict(hidden_size=30, num_heads=4), "not divisible"),
        (dict(head_dim=7), "even"),
        (dict(rope_scheme="2d"), "rope_scheme"),
        (dict(attn_impl="dense"), "attn_impl"),
        (dict(code_offset=50), "code_offset"),
        (dict(vocab_size=120), "vocab_size"),
        (dict(boi_id=7), "boi_id"),
        (dict(eos_id=1), "distinct"),
        (dict(max_image_side=60), "size tokens"),
        (dict(num_layers=0), "num_layers"),
    ],
)
def test_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_config_vocabulary_layout(text_tokenizer: TextTokenizer) -> None:
    cfg = tiny_config(text_tokenizer)
    tok = text_tokenizer
    assert cfg.image_code_range == (tok.vocab_size, tok.vocab_size + NUM_CODES)
    assert cfg.vocab_size == tok.vocab_size + NUM_CODES
    assert (cfg.h_token(3), cfg.w_token(5)) == (tok.h_token(3), tok.w_token(5))
    assert cfg.size_from_tokens(tok.h_token(3), tok.w_token(5)) == (3, 5)
    assert cfg.tie_word_embeddings is False and tiny_config(tie_embeddings=True).tie_word_embeddings


def test_forward_input_errors() -> None:
    model = tiny_model(max_position=16)
    with pytest.raises(ValueError, match="max_position"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, 4, dtype=torch.long), positions=torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="more than the row"):
        model(torch.zeros(1, 4, dtype=torch.long), seq_lens=[[3, 2]])


# ----------------------------------------------------------------------------- presets
def test_preset_parameter_counts() -> None:
    expected = {"tiny": 997_760, "small": 4_404_608, "base": 103_013_120}
    assert list(PRESETS) == list(expected)
    for name, n in expected.items():
        cfg = preset_config(name)
        assert count_parameters(cfg) == n
        with torch.device("meta"):  # no memory, no init cost
            model = MMDecoderForCausalLM(cfg)
        assert sum(p.numel() for p in model.parameters()) == n
    other = preset_config("tiny", text_vocab_size=400, num_image_codes=4096, max_image_side=16)
    assert count_parameters(other) == count_parameters(preset_config("tiny")) + (400 + 4096 - 1512) * 128
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge")
