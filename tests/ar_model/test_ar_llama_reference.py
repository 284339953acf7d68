"""Reference: configured as plain Llama, the decoder reproduces transformers' ``LlamaForCausalLM``."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ar_model.config import MMDecoderConfig
from ar_model.modeling import MMDecoderForCausalLM
from ar_model.packing import IGNORE_INDEX
from ar_model.positions import multimodal_positions

VOCAB = dict(text_vocab_size=100, num_image_codes=28, max_image_side=4)  # vocab_size 128


def _pair(num_kv_heads: int, tied: bool, attn: str) -> tuple[MMDecoderForCausalLM, LlamaForCausalLM]:
    torch.manual_seed(0)
    ours = MMDecoderForCausalLM(
        MMDecoderConfig(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=num_kv_heads,
            intermediate_size=96,
            rms_norm_eps=1e-6,
            rope_base=10000.0,
            rope_scheme="flat",
            qk_norm=False,
            tie_embeddings=tied,
            initializer_range=0.1,  # larger than usual: logits with some spread
            **VOCAB,
        )
    ).eval()
    llama_cfg = LlamaConfig(
        vocab_size=ours.config.vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        attn_implementation=attn,
    )
    llama = LlamaForCausalLM(llama_cfg).eval()
    result = llama.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    if tied:
        assert llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()
    return ours, llama


@pytest.mark.parametrize(
    ("num_kv_heads", "tied", "attn"),
    [(4, False, "eager"), (2, False, "sdpa"), (1, True, "eager"), (2, True, "sdpa")],
)
def test_logits_match_llama(num_kv_heads: int, tied: bool, attn: str) -> None:
    ours, llama = _pair(num_kv_heads, tied, attn)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    positions = multimodal_positions([("text", 24)], "flat").expand(2, 24, 2)  # (b, n, 2)
    with torch.no_grad():
        ref = llama(ids).logits
        got = ours(ids, positions=positions).logits
        got_default = ours(ids).logits  # positions=None: 1-D positions
    assert got.shape == ref.shape == (2, 24, 128)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert torch.equal(got, got_default)


def test_loss_matches_llama_with_shifted_labels() -> None:
    """Our labels are pre-shifted (labels[t] = ids[t+1]); transformers shifts inside. Same loss."""
    ours, llama = _pair(2, False, "sdpa")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    with torch.no_grad():
        ref = llama(ids, labels=ids).loss
        got = ours(ids, labels=labels).loss
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
