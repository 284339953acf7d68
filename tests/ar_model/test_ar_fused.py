"""The hand-written backward passes of the decoder (RMSNorm, RoPE, LM head + cross-entropy) against autograd,
and training gradients against transformers' ``LlamaForCausalLM``."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ar_model.attention import KVCache, plan_attention
from ar_model.config import MMDecoderConfig
from ar_model.modeling import MMDecoderForCausalLM, RMSNorm, _LinearCrossEntropy, _RMSNormFunction, lm_loss
from ar_model.packing import IGNORE_INDEX
from ar_model.rope import apply_rope, rope_angles, rope_tables, rotate


def test_rmsnorm_backward_matches_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=g, requires_grad=True)
    norm = RMSNorm(16, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=g, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-6), (x, norm.weight))
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(norm(x), ref)
    with torch.no_grad():  # the inference path (F.rms_norm) gives the same values
        torch.testing.assert_close(norm(x), ref)


def test_rotate_equals_apply_rope_and_its_backward_is_the_inverse_rotation() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 3, 16, dtype=torch.float64, generator=g, requires_grad=True)  # (b, n, h, d)
    pos = torch.rand(2, 7, 2, generator=g, dtype=torch.float64) * 50  # half-integers and beyond
    cos, sin = rope_tables(pos, 16, dtype=torch.float64)  # (b, n, 1, d)
    c, s = rope_angles(pos, 16)
    ref = apply_rope(x.transpose(1, 2), c, s).transpose(1, 2)
    torch.testing.assert_close(rotate(x, cos, sin), ref, atol=1e-6, rtol=0)  # fp32 angles
    assert torch.autograd.gradcheck(lambda x: rotate(x, cos, sin), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_matches_head_plus_lm_loss(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    n, c, vocab = 700, 24, 300
    hidden = torch.randn(n, c, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, c, generator=g) * 0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::7] = IGNORE_INDEX
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for use in ("loss", "logits", "both"):
        grads = []
        for fused in (True, False):
            if fused:
                logits, loss = _LinearCrossEntropy.apply(hidden, weight, labels)
            else:
                logits = hidden @ weight.t()
                loss = lm_loss(logits, labels)
            out = {
                "loss": 3 * loss,
                "logits": logits.float().pow(2).mean(),
                "both": loss + logits.float().mean(),
            }
            out[use].backward()
            grads.append((loss.detach(), logits.detach(), hidden.grad, weight.grad))
            hidden.grad = weight.grad = None
        for a, b in zip(*grads):
            torch.testing.assert_close(a.float(), b.float(), **tol)
    _, loss = _LinearCrossEntropy.apply(hidden, weight, torch.full_like(labels, IGNORE_INDEX))
    assert loss.item() == 0.0


def test_linear_cross_entropy_of_a_very_wrong_prediction() -> None:
    """p[target] underflows to 0 in fp32 (loss ~ 500): the loss is still logsumexp - logit, not inf."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    weight = torch.tensor([[500.0, 0.0], [0.0, 0.0], [-1.0, 2.0]])
    labels = torch.tensor([1, 2])
    _, loss = _LinearCrossEntropy.apply(hidden, weight, labels)
    torch.testing.assert_close(loss, lm_loss(hidden @ weight.t(), labels))
    assert 240 < loss.item() < 260


def _llama_pair(num_kv_heads: int, tied: bool = False) -> tuple[MMDecoderForCausalLM, LlamaForCausalLM]:
    torch.manual_seed(0)
    ours = MMDecoderForCausalLM(
        MMDecoderConfig(
            hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=num_kv_heads, intermediate_size=96,
            rope_scheme="flat", qk_norm=False, initializer_range=0.1, text_vocab_size=100, num_image_codes=28,
            max_image_side=4, tie_embeddings=tied,
        )
    )  # fmt: skip
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=num_kv_heads, rms_norm_eps=1e-5, max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_implementation="sdpa",
            tie_word_embeddings=tied,
        )
    )  # fmt: skip
    llama.load_state_dict(ours.state_dict(), strict=True)
    return ours, llama


@pytest.mark.parametrize(("num_kv_heads", "tied"), [(4, False), (2, False), (2, True)])
def test_training_gradients_match_llama(num_kv_heads: int, tied: bool) -> None:
    """Loss and every parameter's gradient equal transformers' for the same weights and labels."""
    ours, llama = _llama_pair(num_kv_heads, tied)
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(3))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    labels[0, 4] = IGNORE_INDEX
    hf_labels = torch.cat([torch.full_like(ids[:, :1], IGNORE_INDEX), labels[:, :-1]], dim=1)  # HF shifts
    loss, ref = ours(ids, labels=labels).loss, llama(ids, labels=hf_labels).loss
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    loss.backward()
    ref.backward()
    theirs = dict(llama.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-6, rtol=1e-4, msg=name)


def test_one_document_per_row_uses_causal_attention_and_keeps_real_logits() -> None:
    """Padded batches (one document per row, then padding) run plain causal attention, exactly."""
    assert plan_attention("sdpa_per_doc", 2, 6, torch.device("cpu"), seq_lens=[[4], [6]]).kind == "causal"
    assert plan_attention("sdpa_per_doc", 2, 6, torch.device("cpu"), seq_lens=[[4], [3, 3]]).kind == "per_doc"
    ours, _ = _llama_pair(2)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        padded = ours(ids, seq_lens=[[4], [6]]).logits
        alone = ours(ids[:1, :4]).logits
    torch.testing.assert_close(padded[0, :4], alone[0], atol=1e-6, rtol=0)
    assert torch.isfinite(padded).all()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_lean_layers_equal_the_modules(qk_norm: bool) -> None:
    """Generation's module-free layer path gives the module path's hidden states and cache."""
    torch.manual_seed(0)
    cfg = MMDecoderConfig(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, qk_norm=qk_norm, initializer_range=0.1,
        text_vocab_size=100, num_image_codes=28, max_image_side=4,
    )  # fmt: skip
    model = MMDecoderForCausalLM(cfg).eval().model
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1, so that their weights matter
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    pos = torch.rand(2, 9, 2, generator=torch.Generator().manual_seed(6)) * 20
    cos, sin = rope_tables(pos, cfg.head_dim, cfg.rope_base)
    weights = model.plain_layer_weights()
    assert weights is not None and len(weights) == 2
    outs = []
    for w in (None, weights):
        cache = KVCache(cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim, 9)
        with torch.no_grad():
            plan = plan_attention(cfg.attn_impl, 2, 6, ids.device, cached=True)
            first = model.run_layers(ids[:, :6], cos[:, :6], sin[:, :6], plan, cache, w)
            plan = plan_attention(cfg.attn_impl, 2, 3, ids.device, cached=True, past_len=6)
            rest = model.run_layers(ids[:, 6:], cos[:, 6:], sin[:, 6:], plan, cache, w)
        outs.append((first, rest, cache.keys[1][:, :, :9], cache.values[1][:, :, :9]))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    handle = model.layers[1].mlp.up_proj.register_forward_hook(lambda *args: None)
    assert model.plain_layer_weights() is None  # a hooked module: generation runs the modules
    handle.remove()
    assert model.plain_layer_weights() is not None
