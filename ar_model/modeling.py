"""``MMDecoderForCausalLM``: the Stage-2 decoder over interleaved text and image tokens (DESIGN §3).

A Llama-style pre-norm Transformer (Touvron et al. 2023, arXiv:2302.13971): RMSNorm, SwiGLU MLP,
attention with optional grouped KV heads and QK-norm, no biases, optional tied embeddings. Positions
are 2-D ``(b, n, 2)`` floats from :mod:`ar_model.positions`, rotated by the 2-D RoPE of
:mod:`ar_model.rope`; packed rows attend within their documents (:mod:`ar_model.attention`).

Parameter names follow transformers' ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj`` ...),
so a ``flat``/no-QK-norm decoder and a Llama share state dicts. Registered with ``AutoConfig``,
``AutoModel`` and ``AutoModelForCausalLM`` on import.

Labels are aligned with ``input_ids`` (``labels[t]`` is the target *at* position ``t``), as
:func:`ar_model.sequence.build_sequence` and the packer produce them: the model does not shift them.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ar_model.attention import AttentionPlan, KVCache, attend, plan_attention
from ar_model.config import MMDecoderConfig
from ar_model.packing import IGNORE_INDEX
from ar_model.rope import apply_rope, rope_angles

try:  # transformers >= 5: init functions that skip tensors a checkpoint already filled
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4.x
    from torch.nn import init


_checkpoint = partial(checkpoint, use_reentrant=False)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) * weight`` (Zhang & Sennrich 2019, arXiv:1910.07467), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer 2020, "GLU Variants Improve Transformer", 2002.05202)."""

    def __init__(self, config: MMDecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.down_proj.is_residual_proj = True  # scaled init, see MMDecoderPreTrainedModel._init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads (Ainslie et al. 2023, arXiv:2305.13245) and QK-norm.

    QK-norm is an RMSNorm over ``head_dim`` on q and k before RoPE (Dehghani et al. 2023,
    arXiv:2302.05442; as in Chameleon and Qwen3).
    """

    def __init__(self, config: MMDecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = d = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=False)
        self.o_proj.is_residual_proj = True
        self.q_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``x (b, n, c)``, ``cos/sin (b, n, d)`` → ``(b, n, c)``; legend: h heads, d head_dim, m keys."""
        b, n, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, n, self.num_heads, d).transpose(1, 2)  # (b, n, h*d) -> (b, h, n, d)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, d).transpose(1, 2)  # (b, h_kv, n, d)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, d).transpose(1, 2)  # (b, h_kv, n, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (b, h_kv, m, d), m = cached + n
        out = attend(q, k, v, plan)  # (b, h, n, d)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * d))  # (b, n, h*d) -> (b, n, c)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: MMDecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MMDecoderPreTrainedModel(PreTrainedModel):
    """Shared init and transformers plumbing."""

    config_class = MMDecoderConfig
    config: MMDecoderConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        """Explicit init (also called by ``from_pretrained`` for weights a checkpoint lacks).

        Linear and embedding weights ~ N(0, initializer_range); norms = 1. The projections that write
        into the residual stream (``o_proj``, ``down_proj``) use std ``initializer_range / sqrt(2 L)``
        so that the residual variance does not grow with depth (GPT-2, Radford et al. 2019). The model
        has no derived buffers: RoPE frequencies are computed from the config in every forward.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_proj", False):
                std = std / math.sqrt(2 * self.config.num_layers)
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)


class MMDecoderModel(MMDecoderPreTrainedModel):
    """Embedding → decoder layers → final norm; returns hidden states ``(b, n, c)``."""

    def __init__(self, config: MMDecoderConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = config.gradient_checkpointing
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        seq_lens: list[list[int]] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Hidden states for ``input_ids (b, n)`` at ``positions (b, n, 2)``.

        Packed rows: give ``doc_ids (b, n)`` (-1 = padding) and/or ``seq_lens`` (per row, its document
        lengths in order); attention then stays within documents (``config.attn_impl``). Left-padded
        rows: ``attention_mask (b, cached + n)``, true for real tokens. Generation: pass a
        :class:`KVCache` (or ``use_cache=True`` to start one); it is returned in ``past_key_values``.
        ``positions=None`` means 1-D positions ``cached .. cached + n - 1`` on both axes.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (b, n), got {tuple(input_ids.shape)}")
        b, n = input_ids.shape
        cfg = self.config
        if use_cache and past_key_values is None:
            param = self.embed_tokens.weight
            past_key_values = KVCache(
                cfg.num_layers, b, cfg.num_kv_heads, cfg.head_dim, n, dtype=param.dtype, device=param.device
            )
        past = past_key_values.length if past_key_values is not None else 0
        if past + n > cfg.max_position:
            raise ValueError(f"sequence of {past + n} tokens exceeds max_position={cfg.max_position}")
        if positions is None:
            p = torch.arange(past, past + n, device=input_ids.device, dtype=torch.float32)  # (n,)
            positions = p[None, :, None].expand(b, n, 2)  # (b, n, 2): text-like (p, p)
        elif positions.shape != (b, n, 2):
            raise ValueError(f"positions must be (b, n, 2) = {(b, n, 2)}, got {tuple(positions.shape)}")

        x = self.embed_tokens(input_ids)  # (b, n, c)
        # RoPE angles once per forward in fp32, shared by all layers, cast once to the activations' dtype.
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_base)  # each (b, n, d)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        plan = plan_attention(
            cfg.attn_impl,
            b,
            n,
            input_ids.device,
            doc_ids=doc_ids,
            seq_lens=seq_lens,
            attention_mask=attention_mask,
            past_len=past,
            cached=past_key_values is not None,
        )
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled() and past_key_values is None:
                # transformers' activation_checkpointing_enable() may install its own function (offload...).
                ckpt = getattr(self, "_gradient_checkpointing_func", None) or _checkpoint
                x = ckpt(layer, x, cos, sin, plan, None)
            else:
                x = layer(x, cos, sin, plan, past_key_values)
        if past_key_values is not None:
            past_key_values.advance(n)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), past_key_values=past_key_values)


class MMDecoderForCausalLM(MMDecoderPreTrainedModel):
    """:class:`MMDecoderModel` plus an LM head over the shared vocabulary (text ids and image codes)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MMDecoderConfig) -> None:
        super().__init__(config)
        self.model = MMDecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        seq_lens: list[list[int]] | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits ``(b, n, V)`` (the last ``logits_to_keep`` positions if > 0) and the loss.

        ``loss`` is the mean cross-entropy (in fp32) over tokens whose label is not -100; labels are
        aligned with ``input_ids`` (already shifted). Other arguments: see :meth:`MMDecoderModel.forward`.
        """
        out = self.model(
            input_ids,
            positions=positions,
            doc_ids=doc_ids,
            seq_lens=seq_lens,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state  # (b, n, c)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]  # (b, k, c)
        logits = self.lm_head(hidden)  # (b, n or k, V)
        loss = None
        if labels is not None:
            if logits_to_keep > 0:
                raise ValueError("labels need the logits of every position (logits_to_keep=0)")
            loss = lm_loss(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labels != -100, in fp32; 0 (not NaN) when every label is ignored."""
    flat = logits.float().reshape(-1, logits.shape[-1])  # (b*n, V)
    targets = labels.reshape(-1)  # (b*n,)
    total = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


AutoConfig.register(MMDecoderConfig.model_type, MMDecoderConfig)
AutoModel.register(MMDecoderConfig, MMDecoderModel)
AutoModelForCausalLM.register(MMDecoderConfig, MMDecoderForCausalLM)
