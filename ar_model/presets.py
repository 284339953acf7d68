"""Named decoder sizes with their parameter counts (as DiT's ``DiT_models``, LlamaGen's ``GPT_models``).

Counts depend on the vocabulary; the comments give them at the reference vocabulary
``REFERENCE_VOCAB`` (512 text ids + 1,000 FSQ codes of levels [8, 5, 5, 5]), and
:func:`count_parameters` computes them for any config without building the model.
"""

from __future__ import annotations

from typing import Any

from ar_model.config import MMDecoderConfig

REFERENCE_VOCAB: dict[str, int] = {"text_vocab_size": 512, "num_image_codes": 1000}

PRESETS: dict[str, dict[str, Any]] = {
    # CPU: a few minutes of training on 2 cores.
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, tie_embeddings=True),  # 1.0M
    "small": dict(hidden_size=256, num_layers=5, num_heads=4, tie_embeddings=True),  # 4.4M
    # GPU: bf16, FSDP.
    "base": dict(hidden_size=768, num_layers=16, num_heads=12, num_kv_heads=4),  # 103M
}


def preset_config(name: str, **overrides: Any) -> MMDecoderConfig:
    """``MMDecoderConfig`` of a preset; ``overrides`` set the vocabulary layout and any other field."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    return MMDecoderConfig(**{**REFERENCE_VOCAB, **PRESETS[name], **overrides})


def count_parameters(config: MMDecoderConfig) -> int:
    """Parameters of :class:`~ar_model.modeling.MMDecoderForCausalLM` for ``config``, in closed form."""
    c = config
    d, hidden = c.head_dim, c.hidden_size
    attn = hidden * d * (2 * c.num_heads + 2 * c.num_kv_heads)  # q, o and k, v projections
    qk_norm = 2 * d if c.qk_norm else 0
    mlp = 3 * hidden * c.intermediate_size  # gate, up, down
    layer = attn + qk_norm + mlp + 2 * hidden  # two RMSNorms
    embed = c.vocab_size * hidden
    head = 0 if c.tie_embeddings else c.vocab_size * hidden
    return embed + c.num_layers * layer + hidden + head  # + final norm
