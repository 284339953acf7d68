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

Speed (issue 3, ``benchmarks/bench_decoder_train.py``): on CPU a step is mostly matmuls and attention,
which are what they are; the rest is elementwise passes over activations. RMSNorm and RoPE have
hand-written backward passes (about half of autograd's passes; RoPE runs on the projections' own layout
with precomputed tables), and the LM head and the loss are one autograd function that needs a single
softmax per logit (:class:`_LinearCrossEntropy`). For generation (``benchmarks/bench_generation.py``),
where a step is a few dozen tiny ops, :meth:`MMDecoderModel.run_layers` can run the layers as plain
function calls on their weights (:func:`lean_layer`). Tests pin all of it to ``LlamaForCausalLM``
(logits, loss and every gradient) and to the module path.

Continuous image tokens (issue 4): a model with ``config.latent_dim > 0`` embeds ``latents (b, n, D)``
with ``latent_proj`` wherever ``latent_mask (b, n)`` is true (instead of the placeholder id's embedding)
and carries a :class:`~ar_model.diffusion_head.DiffusionHead` trained with the flow loss of
:mod:`ar_model.flow_matching` on the hidden state *before* each latent. With ``latent_dim = 0`` (the
default) none of this exists: parameters, state dict and outputs are those of the discrete model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ar_model.attention import (
    AttentionPlan,
    KVCache,
    attend,
    block_causal_mask,
    doc_ids_from_seq_lens,
    padding_causal_mask,
    plan_attention,
)
from ar_model.code_groups import CodeGroupHead
from ar_model.config import MMDecoderConfig
from ar_model.diffusion_head import DiffusionHead
from ar_model.flow_matching import FlowLoss, flow_matching_loss
from ar_model.image_blocks import bidirectional_mask, image_block_ids
from ar_model.packing import IGNORE_INDEX
from ar_model.rope import rope_tables, rotate

try:  # transformers >= 5: init functions that skip tensors a checkpoint already filled
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4.x
    from torch.nn import init


# transformers 5.24 renamed the outputs' KV-cache field ``past_key_values`` to ``cache`` (the old name
# still works but logs a deprecation warning); use whichever this version has.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(output) -> KVCache | None:
    """The KV cache of a model output (``output.cache`` or, before transformers 5.24, ``past_key_values``)."""
    return getattr(output, CACHE_FIELD)


_checkpoint = partial(checkpoint, use_reentrant=False)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward: about half the elementwise passes of autograd's graph.

    With ``x̂ = x · r``, ``r = 1 / sqrt(mean(x²) + eps)`` and ``y = w · x̂``:
    ``dx = r · (g·w − x̂ · mean(g·w · x̂))`` and ``dw = Σ g · x̂`` over every leading dimension.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 -> fp32; fp32 / fp64 unchanged
        rstd = torch.rsqrt(torch.linalg.vecdot(xf, xf, dim=-1).unsqueeze_(-1).div_(x.shape[-1]).add_(eps))
        xhat = xf * rstd  # (..., c) in fp32 (or fp64)
        ctx.save_for_backward(xhat, weight, rstd)
        return weight * xhat.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        xhat, weight, rstd = ctx.saved_tensors
        g = grad.to(xhat.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g * xhat).flatten(0, -2).sum(0).to(weight.dtype)  # (c,)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gw = g * weight.to(xhat.dtype)  # (..., c)
            dot = torch.linalg.vecdot(gw, xhat, dim=-1).unsqueeze_(-1).div_(-xhat.shape[-1])  # (..., 1)
            grad_x = gw.addcmul_(xhat, dot).mul_(rstd).to(grad.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps) * weight`` over the last dimension (Zhang & Sennrich 2019,
    arXiv:1910.07467), normalised in fp32 and cast back before the weight, as transformers' Llama."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNormFunction.apply(x, weight, eps)
    # Inference (generation runs this twice per layer and token): one call, no autograd bookkeeping.
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    """:func:`rms_norm` with a learned weight (ones at init)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


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
        """``x (b, n, c)`` and RoPE tables ``cos/sin (b, n, 1, d)`` (from ``rope_tables``) → ``(b, n, c)``.

        Legend: h heads, h_kv key/value heads, d head_dim, m keys. RoPE and QK-norm work on the
        projections' own ``(b, n, h, d)`` layout; attention gets ``(b, h, n, d)`` views of it (no copies).
        """
        b, n, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, n, self.num_heads, d)  # (b, n, h*d) -> (b, n, h, d)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, d)  # (b, n, h_kv, d)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, d)  # (b, n, h_kv, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(_rope_attention(q, k, v, cos, sin, plan, cache, self.layer_idx))


def _rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    plan: AttentionPlan,
    cache: KVCache | None,
    layer_idx: int,
) -> torch.Tensor:
    """RoPE on ``q (b, n, h, d)`` and ``k, v (b, n, h_kv, d)``, the KV cache, attention → ``(b, n, h*d)``."""
    b, n, h, d = q.shape
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, h or h_kv, n, d) views
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)  # (b, h_kv, m, d), m = cached + n
    out = attend(q, k, v, plan)  # (b, h, n, d)
    return out.transpose(1, 2).reshape(b, n, h * d)  # (b, n, h*d)


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

    def plain_weights(self) -> LayerWeights | None:
        """This layer's weights for :func:`lean_layer`, or None if a submodule is wrapped or hooked."""
        attn, mlp = self.self_attn, self.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj]
        linears.append(mlp.down_proj)
        norms = [self.input_layernorm, self.post_attention_layernorm]
        if attn.q_norm is not None:
            norms += [attn.q_norm, attn.k_norm]
        plain = (
            type(attn) is Attention
            and type(mlp) is SwiGLU
            and all(type(m) is nn.Linear and m.bias is None for m in linears)
            and all(type(m) is RMSNorm for m in norms)
            and all(_unhooked(m) for m in [self, attn, mlp, *linears, *norms])
        )
        if not plain:
            return None
        q, k, v, o, gate, up, down = (m.weight for m in linears)
        qn, kn = (attn.q_norm.weight, attn.k_norm.weight) if attn.q_norm is not None else (None, None)
        norm1, norm2 = self.input_layernorm.weight, self.post_attention_layernorm.weight
        eps = self.input_layernorm.eps
        return LayerWeights(norm1, q, k, v, o, qn, kn, norm2, gate, up, down, eps, attn.layer_idx)


class LayerWeights(NamedTuple):
    """One decoder layer's tensors, for :func:`lean_layer`."""

    norm1: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    norm2: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    eps: float
    layer_idx: int


def lean_layer(
    x: torch.Tensor,
    w: LayerWeights,
    cos: torch.Tensor,
    sin: torch.Tensor,
    plan: AttentionPlan,
    cache: KVCache | None,
) -> torch.Tensor:
    """:class:`DecoderLayer` as plain function calls on its weights (the same ops, in the same order).

    Generation runs this once per layer and token: a decoder step is a few dozen tiny ops, and going
    through ~12 ``nn.Module`` calls per layer costs about 15% of a step on CPU. Only used when every
    submodule is the plain, hook-free kind (:meth:`DecoderLayer.plain_weights`); tests compare it with
    the module path.
    """
    b, n, _ = x.shape
    d = cos.shape[-1]  # head_dim
    y = rms_norm(x, w.norm1, w.eps)
    q = F.linear(y, w.q).view(b, n, -1, d)  # (b, n, h, d)
    k = F.linear(y, w.k).view(b, n, -1, d)  # (b, n, h_kv, d)
    v = F.linear(y, w.v).view(b, n, -1, d)  # (b, n, h_kv, d)
    if w.q_norm is not None:
        q, k = rms_norm(q, w.q_norm, w.eps), rms_norm(k, w.k_norm, w.eps)
    x = x + F.linear(_rope_attention(q, k, v, cos, sin, plan, cache, w.layer_idx), w.o)
    y = rms_norm(x, w.norm2, w.eps)
    return x + F.linear(F.silu(F.linear(y, w.gate)) * F.linear(y, w.up), w.down)


def _unhooked(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


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
        has no derived buffers: RoPE frequencies are computed from the config in every forward. Biases
        (only ``latent_proj`` and the diffusion head have them) start at zero; the diffusion head then
        applies its own init (zero AdaLN modulation and output, :meth:`DiffusionHead.init_weights`),
        which runs after its submodules'.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_proj", False):
                std = std / math.sqrt(2 * self.config.num_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, DiffusionHead):
            module.init_weights(init)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm | nn.RMSNorm):
            init.ones_(module.weight)


class MMDecoderModel(MMDecoderPreTrainedModel):
    """Embedding → decoder layers → final norm; returns hidden states ``(b, n, c)``."""

    def __init__(self, config: MMDecoderConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # Continuous tokens: embedded by a linear layer at their positions (issue 4); absent if discrete.
        self.latent_proj = nn.Linear(config.latent_dim, config.hidden_size) if config.latent_dim else None
        # Grouped codes: one table per slot of a position's block (code c of slot s at row s·K + c).
        g = config.codes_per_group
        self.group_embed = nn.Embedding(g * config.num_image_codes, config.hidden_size) if g > 1 else None
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
        latents: torch.Tensor | None = None,
        latent_mask: torch.Tensor | None = None,
        code_groups: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Hidden states for ``input_ids (b, n)`` at ``positions (b, n, 2)``.

        Packed rows: give ``doc_ids (b, n)`` (-1 = padding) and/or ``seq_lens`` (per row, its document
        lengths in order); attention then stays within documents (``config.attn_impl``). Left-padded
        rows: ``attention_mask (b, cached + n)``, true for real tokens. Generation: pass a
        :class:`KVCache` (or ``use_cache=True`` to start one); it is returned in ``past_key_values``.
        ``positions=None`` means 1-D positions ``cached .. cached + n - 1`` on both axes.
        Continuous tokens (``config.latent_dim > 0``): ``latents (b, n, latent_dim)`` replace the token
        embedding where ``latent_mask (b, n)`` is true (see :meth:`embed`). Grouped codes
        (``config.code_group > 1``): ``code_groups (b, n, G)`` long, read where ``input_ids`` is
        ``config.group_token_id``.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (b, n), got {tuple(input_ids.shape)}")
        b, n = input_ids.shape
        cfg = self.config
        self.check_latents(input_ids, latents, latent_mask)
        self.check_code_groups(input_ids, code_groups)
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
        if cfg.image_attention == "bidirectional":
            plan = self.image_attention_plan(
                plan,
                input_ids,
                doc_ids=doc_ids,
                seq_lens=seq_lens,
                attention_mask=attention_mask,
                past_len=past,
            )
        # RoPE tables once per forward (angles in fp32, cast once), shared by all layers.
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_base, self.embed_tokens.weight.dtype)
        hidden = self.run_layers(
            input_ids,
            cos,
            sin,
            plan,
            past_key_values,
            latents=latents,
            latent_mask=latent_mask,
            code_groups=code_groups,
        )
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_FIELD: past_key_values})

    def image_attention_plan(
        self,
        plan: AttentionPlan,
        input_ids: torch.Tensor,
        *,
        doc_ids: torch.Tensor | None = None,
        seq_lens: list[list[int]] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_len: int = 0,
    ) -> AttentionPlan:
        """``plan`` widened so that the tokens of each image block see each other (``image_attention=
        "bidirectional"``): a dense boolean mask ``causal-within-document ∨ same-block`` (exact for packed
        rows), or ``plan`` itself when no image token is present. With a KV cache (``plan.kind ==
        "cached"``) the cached tokens are outside every block, so a block must be fed in one call."""
        b, n = input_ids.shape
        segments = doc_ids_from_seq_lens(seq_lens, n, input_ids.device) if seq_lens is not None else doc_ids
        blocks = image_block_ids(input_ids, self.config.latent_token_id, segments)  # (b, n)
        if not bool((blocks >= 0).any()):
            return plan
        key_blocks = blocks  # (b, m)
        if plan.kind == "cached":
            keys = attention_mask
            if keys is None:
                keys = torch.ones(b, past_len + n, dtype=torch.bool, device=input_ids.device)
            base = padding_causal_mask(keys, n)  # (b, 1, n, past + n)
            key_blocks = F.pad(blocks, (past_len, 0), value=-1)  # (b, past + n)
        elif attention_mask is not None:
            base = padding_causal_mask(attention_mask, n)  # (b, 1, n, n)
        elif segments is not None:
            base = block_causal_mask(segments)  # (b, 1, n, n)
        else:
            idx = torch.arange(n, device=input_ids.device)
            base = (idx[:, None] >= idx[None, :])[None, None]  # (1, 1, n, n)
        kind = "cached" if plan.kind == "cached" else "dense"
        return AttentionPlan(kind=kind, mask=bidirectional_mask(base, blocks, key_blocks))

    def check_latents(
        self, input_ids: torch.Tensor, latents: torch.Tensor | None, latent_mask: torch.Tensor | None
    ) -> None:
        """ValueError unless ``latents (b, n, latent_dim)`` and ``latent_mask (b, n)`` bool come together,
        fit ``input_ids (b, n)`` and this model's ``latent_dim``, and are finite (syncs with the host)."""
        if latents is None and latent_mask is None:
            return
        dim = self.config.latent_dim
        if dim == 0:
            raise ValueError("this model is discrete (config.latent_dim=0): it takes no latents")
        if latents is None or latent_mask is None:
            raise ValueError("latents and latent_mask go together: pass both or neither")
        b, n = input_ids.shape
        if latents.dim() != 3 or latents.shape[:2] != (b, n) or not latents.is_floating_point():
            raise ValueError(
                f"latents must be float (b, n, latent_dim) = {(b, n, dim)}, got {tuple(latents.shape)}"
            )
        if latents.shape[-1] != dim:
            raise ValueError(
                f"latent dimension {latents.shape[-1]} does not match the model's latent_dim={dim} (is the "
                f"image tokenizer the one this decoder was trained with?)"
            )
        if latent_mask.shape != (b, n) or latent_mask.dtype != torch.bool:
            raise ValueError(
                f"latent_mask must be bool (b, n) = {(b, n)}, got {latent_mask.dtype} "
                f"{tuple(latent_mask.shape)}"
            )
        if not bool(torch.isfinite(latents).all()):
            bad = (~torch.isfinite(latents)).any(-1).nonzero()[:4].tolist()  # (k, 2): (row, position)
            raise ValueError(f"latents hold NaN or inf (first (row, position) pairs: {bad})")

    def check_code_groups(self, input_ids: torch.Tensor, code_groups: torch.Tensor | None) -> None:
        """ValueError unless a grouped-code model gets ``code_groups (b, n, G)`` long whose rows at the
        placeholder positions are codes in ``[0, num_image_codes)`` (syncs with the host), and other
        models get none."""
        cfg = self.config
        if code_groups is None:
            if cfg.code_group > 1 and bool((input_ids == cfg.group_token_id).any()):
                raise ValueError("input_ids hold grouped-code placeholders but no code_groups were given")
            return
        if cfg.code_group == 1:
            raise ValueError("this model does not group image codes (config.code_group=1): no code_groups")
        b, n = input_ids.shape
        want = (b, n, cfg.codes_per_group)
        if code_groups.shape != want or code_groups.dtype != torch.long:
            raise ValueError(
                f"code_groups must be long {want}, got {code_groups.dtype} {tuple(code_groups.shape)}"
            )
        used = code_groups[input_ids == cfg.group_token_id]  # (m, G)
        if used.numel() and not (0 <= int(used.min()) and int(used.max()) < cfg.num_image_codes):
            raise ValueError(
                f"code_groups hold codes outside [0, {cfg.num_image_codes}) at image positions "
                f"(min {int(used.min())}, max {int(used.max())})"
            )

    def embed(
        self,
        input_ids: torch.Tensor,
        latents: torch.Tensor | None = None,
        latent_mask: torch.Tensor | None = None,
        code_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings ``(b, n, c)``: ``embed_tokens(input_ids)``; ``latent_proj(latents)`` where
        ``latent_mask`` is true; the sum of the slot embeddings of ``code_groups`` where ``input_ids`` is
        the grouped-code placeholder (unchecked: :meth:`forward` checks)."""
        x = self.embed_tokens(input_ids)  # (b, n, c)
        if code_groups is not None:
            cfg = self.config
            slots = torch.arange(cfg.codes_per_group, device=input_ids.device) * cfg.num_image_codes  # (G,)
            at = (input_ids == cfg.group_token_id)[..., None]  # (b, n, 1)
            rows = torch.where(at, code_groups + slots, 0)  # (b, n, G): row 0 off the image (discarded)
            z = self.group_embed(rows).sum(-2)  # (b, n, G, c) -> (b, n, c)
            x = torch.where(at, z.to(x.dtype), x)
        if latent_mask is None:
            return x
        z = self.latent_proj(latents.to(self.latent_proj.weight.dtype))  # (b, n, D) -> (b, n, c)
        return torch.where(latent_mask[..., None], z.to(x.dtype), x)  # (b, n, c)

    def plain_layer_weights(self) -> list[LayerWeights] | None:
        """Every layer's :class:`LayerWeights` for ``run_layers(..., weights=)``, or None if a layer is
        wrapped or hooked (adapters, hooks: then the modules must run)."""
        weights = [layer.plain_weights() if _unhooked(layer) else None for layer in self.layers]
        return None if any(w is None for w in weights) else weights

    def run_layers(
        self,
        input_ids: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        cache: KVCache | None = None,
        weights: list[LayerWeights] | None = None,
        *,
        latents: torch.Tensor | None = None,
        latent_mask: torch.Tensor | None = None,
        code_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normed hidden states ``(b, n, c)`` from checked inputs (internal: :meth:`forward` and generation).

        ``cos/sin (b, n, 1, d)`` come from :func:`~ar_model.rope.rope_tables`, ``plan`` from
        :func:`~ar_model.attention.plan_attention`; ``cache`` is written and advanced by ``n`` tokens.
        Generation computes the tables of every position once, takes :meth:`plain_layer_weights`, and
        calls this for each new token; with ``weights`` the layers run as :func:`lean_layer`.
        ``latents``/``latent_mask``/``code_groups`` as in :meth:`forward` (:meth:`embed`).
        """
        x = self.embed(input_ids, latents, latent_mask, code_groups)  # (b, n, c)
        if weights is not None:
            for w in weights:
                x = lean_layer(x, w, cos, sin, plan, cache)
            if cache is not None:
                cache.advance(input_ids.shape[1])
            return self.norm(x)
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                # transformers' activation_checkpointing_enable() may install its own function (offload...).
                ckpt = getattr(self, "_gradient_checkpointing_func", None) or _checkpoint
                x = ckpt(layer, x, cos, sin, plan, None)
            else:
                x = layer(x, cos, sin, plan, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.norm(x)


@dataclass
class MMCausalLMOutput(CausalLMOutputWithPast):
    """The output of a continuous-token model (``latent_dim > 0``) or a grouped-code model (``code_group >
    1``): ``CausalLMOutputWithPast`` plus the parts of the loss (``text_loss + flow_loss.weight ·
    flow_loss``, or text and code cross-entropy) and the last hidden states (the image head's
    conditions at generation)."""

    text_loss: torch.FloatTensor | None = None  # mean cross-entropy over labels != -100
    code_loss: torch.FloatTensor | None = None  # grouped codes: mean cross-entropy per image code
    flow_loss: torch.FloatTensor | None = None  # FlowLoss.loss: flow matching and shortcut rows together
    flow_matching_loss: torch.FloatTensor | None = None  # FlowLoss.flow: the d = 0 rows only
    shortcut_loss: torch.FloatTensor | None = None  # FlowLoss.shortcut: the self-consistency rows only
    last_hidden_state: torch.FloatTensor | None = None  # (b, n, c) normed hidden states


class MMDecoderForCausalLM(MMDecoderPreTrainedModel):
    """:class:`MMDecoderModel` plus an LM head over the shared vocabulary (text ids and image codes), and
    for ``config.latent_dim > 0`` a :class:`~ar_model.diffusion_head.DiffusionHead` for continuous tokens."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MMDecoderConfig) -> None:
        super().__init__(config)
        self.model = MMDecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.diffusion_head = (
            DiffusionHead(config.latent_dim, config.hidden_size, config.head_config)
            if config.latent_dim
            else None
        )
        self.group_head = (
            CodeGroupHead(
                config.hidden_size,
                config.num_image_codes,
                config.codes_per_group,
                config.code_group_width,
                num_layers=config.code_group_layers,
                num_heads=config.num_heads,
                eps=config.rms_norm_eps,
            )
            if config.code_group > 1
            else None
        )
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
        latents: torch.Tensor | None = None,
        latent_mask: torch.Tensor | None = None,
        flow_generator: torch.Generator | None = None,
        code_groups: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits ``(b, n, V)`` (the last ``logits_to_keep`` positions if > 0) and the loss.

        ``loss`` is the mean cross-entropy (in fp32) over tokens whose label is not -100; labels are
        aligned with ``input_ids`` (already shifted). Other arguments: see :meth:`MMDecoderModel.forward`.

        Continuous-token models (``latent_dim > 0``) return :class:`MMCausalLMOutput`. With ``labels`` and
        ``latents``/``latent_mask`` the loss is ``text CE + flow_loss.weight · flow loss``, the flow loss
        (:func:`~ar_model.flow_matching.flow_matching_loss`) over the pairs of :meth:`flow_pairs`, its
        noise and times drawn from ``flow_generator``. With ``flow_loss.input_noise`` σ > 0 the trunk then
        reads ``latents + σ·ε`` (ε from ``flow_generator``), while the flow targets stay clean.

        Grouped-code models (``code_group > 1``) also return :class:`MMCausalLMOutput`. With ``labels``
        and ``code_groups (b, n, G)`` the loss is the mean cross-entropy over every predicted symbol: the
        text labels and the ``G`` codes of each image position, which :class:`CodeGroupHead` predicts
        from the hidden state of the position before (``code_loss`` is their mean alone).
        """
        inputs = latents
        sigma = self.config.flow_loss_config.input_noise if self.diffusion_head is not None else 0.0
        if labels is not None and latents is not None and sigma > 0:
            eps = torch.randn(latents.shape, generator=flow_generator, device=latents.device)  # (b, n, D)
            inputs = latents + sigma * eps.to(latents.dtype)
        out = self.model(
            input_ids,
            positions=positions,
            doc_ids=doc_ids,
            seq_lens=seq_lens,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            latents=inputs,
            latent_mask=latent_mask,
            code_groups=code_groups,
            **kwargs,
        )
        hidden = out.last_hidden_state  # (b, n, c)
        if logits_to_keep > 0:
            if labels is not None:
                raise ValueError("labels need the logits of every position (logits_to_keep=0)")
            hidden = hidden[:, -logits_to_keep:]  # (b, k, c)
        loss = None
        if labels is not None and self._plain_lm_head():
            b, n, c = hidden.shape
            logits, loss = _LinearCrossEntropy.apply(
                hidden.reshape(b * n, c), self.lm_head.weight, labels.reshape(b * n)
            )
            logits = logits.view(b, n, -1)  # (b*n, V) -> (b, n, V)
        else:
            logits = self.lm_head(hidden)  # (b, n or k, V)
            if labels is not None:
                loss = lm_loss(logits, labels)
        if self.group_head is not None:
            return self._grouped_output(out, input_ids, logits, loss, labels, code_groups, doc_ids, seq_lens)
        if self.diffusion_head is None:
            return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: output_cache(out)})
        result = MMCausalLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: output_cache(out)},
            text_loss=loss,
            last_hidden_state=out.last_hidden_state,
        )
        if labels is not None and latents is not None:
            predict = None
            if self.config.image_attention == "bidirectional":  # MAR: masked image positions are the targets
                predict = (input_ids == self.config.latent_token_id) & ~latent_mask  # (b, n)
            flow = self.flow_loss(
                out.last_hidden_state,
                latents,
                latent_mask,
                doc_ids,
                seq_lens,
                generator=flow_generator,
                predict_mask=predict,
            )
            result.loss = loss + self.config.flow_loss_config.weight * flow.loss
            result.flow_loss, result.flow_matching_loss, result.shortcut_loss = flow
        return result

    def _grouped_output(
        self,
        out: BaseModelOutputWithPast,
        input_ids: torch.Tensor,
        logits: torch.Tensor,
        text_loss: torch.Tensor | None,
        labels: torch.Tensor | None,
        code_groups: torch.Tensor | None,
        doc_ids: torch.Tensor | None,
        seq_lens: list[list[int]] | None,
    ) -> MMCausalLMOutput:
        """:meth:`forward`'s result for a grouped-code model: text and code cross-entropy together."""
        result = MMCausalLMOutput(
            loss=text_loss,
            logits=logits,
            **{CACHE_FIELD: output_cache(out)},
            text_loss=text_loss,
            last_hidden_state=out.last_hidden_state,
        )
        if labels is None or code_groups is None:
            return result
        at = input_ids == self.config.group_token_id  # (b, n)
        # the hidden state at i predicts the codes at i + 1 when i + 1 is an image position of its document
        cond, target = self.flow_pairs(
            out.last_hidden_state, code_groups, at, doc_ids, seq_lens
        )  # (N, c), (N, G)
        code_sum = self.group_head.loss(cond, target)
        num_text = (labels != IGNORE_INDEX).sum()
        num_codes = target.numel()
        result.code_loss = code_sum / max(num_codes, 1)
        result.loss = (text_loss * num_text + code_sum) / (num_text + num_codes).clamp(min=1)
        return result

    @staticmethod
    def flow_pairs(
        hidden: torch.Tensor,
        latents: torch.Tensor,
        latent_mask: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        seq_lens: list[list[int]] | None = None,
        *,
        predict_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditions ``(N, c)`` and targets ``(N, D)`` of the flow loss, in row-major order (also the
        pairs of the code-group loss, with ``latents`` the code groups ``(b, n, G)``).

        The hidden state at position ``i`` conditions the latent at ``i + 1`` whenever ``i + 1`` is a
        latent of the same document (DESIGN §3: "c = hidden state of the previous position"). Packed rows:
        documents from ``seq_lens`` (preferred: it also separates chunks of a split document) or
        ``doc_ids``, so that no pair crosses a document boundary. With ``predict_mask (b, n)``
        (bidirectional image attention) the pairs are instead ``hidden[p] → latents[p]`` for every
        position ``p`` in the mask (the masked image tokens, MAR).
        """
        if predict_mask is not None:
            return hidden[predict_mask], latents[predict_mask]  # (N, c), (N, D)
        b, n, _ = hidden.shape
        nxt = latent_mask[:, 1:]  # (b, n-1): the next token is a latent
        segments = doc_ids_from_seq_lens(seq_lens, n, hidden.device) if seq_lens is not None else doc_ids
        if segments is not None:
            nxt = nxt & (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] >= 0)  # (b, n-1)
        return hidden[:, :-1][nxt], latents[:, 1:][nxt]  # (N, c), (N, D)

    def flow_loss(
        self,
        hidden: torch.Tensor,
        latents: torch.Tensor,
        latent_mask: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        seq_lens: list[list[int]] | None = None,
        generator: torch.Generator | None = None,
        predict_mask: torch.Tensor | None = None,
    ) -> FlowLoss:
        """:func:`~ar_model.flow_matching.flow_matching_loss` of the diffusion head over :meth:`flow_pairs`
        of ``hidden (b, n, c)`` (the decoder's normed output) and ``latents (b, n, D)``."""
        if self.diffusion_head is None:
            raise ValueError("this model has no diffusion head (config.latent_dim=0)")
        cond, target = self.flow_pairs(
            hidden, latents, latent_mask, doc_ids, seq_lens, predict_mask=predict_mask
        )
        return flow_matching_loss(self.diffusion_head, cond, target, self.config.flow_loss_config, generator)

    def _plain_lm_head(self) -> bool:
        """True when ``lm_head`` is a bare ``nn.Linear`` (no bias, no hooks, e.g. no adapter wrapping it)."""
        head = self.lm_head
        return type(head) is nn.Linear and head.bias is None and _unhooked(head)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labels != -100, in fp32; 0 (not NaN) when every label is ignored."""
    flat = logits.float().reshape(-1, logits.shape[-1])  # (b*n, V)
    targets = labels.reshape(-1)  # (b*n,)
    total = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def _ce_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk of :class:`_LinearCrossEntropy`: about 4 Mi logits (16 MB in fp32)."""
    return max(1, (1 << 22) // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    """``logits = hidden @ weight.T`` and :func:`lm_loss` of them, in row chunks, with one softmax per logit.

    Same values as ``lm_head`` + :func:`lm_loss`. Autograd's cross-entropy runs a log-softmax forward
    and another softmax pass in backward, after zero-filling an ``(N, V)`` gradient. Here each chunk of
    logits goes through one softmax in forward, which gives the loss of its rows and is turned in place
    into their gradient ``softmax − one_hot`` (zero for ignored labels), kept for backward; backward
    only runs the head's two matmuls chunk by chunk and scales their outputs by ``grad / count``. This is
    a fused linear cross-entropy as in Liger-Kernel (Hsu et al. 2024, arXiv:2410.10989), except that the
    logits are kept (they are returned) instead of recomputed. A gradient flowing into the returned
    logits themselves is added chunk by chunk. Memory: the ``(N, V)`` fp32 gradient lives from forward
    to backward, as autograd's saved log-softmax would.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
        # hidden (N, c), weight (V, c), labels (N,)
        logits = hidden @ weight.t()  # (N, V); under autocast in its dtype (bf16)
        valid = labels != IGNORE_INDEX  # (N,)
        count = valid.sum().clamp(min=1)
        targets = labels.masked_fill(~valid, 0)[:, None]  # (N, 1): any class for ignored rows (zeroed below)
        ignored = (~valid).nonzero()[:, 0]  # (I,) rows without a label
        total = logits.new_zeros((), dtype=torch.float32)
        grads = []
        step = _ce_chunk_rows(logits.shape[1])
        for s in range(0, logits.shape[0], step):
            x = logits[s : s + step].float()  # (k, V)
            t = targets[s : s + step]  # (k, 1)
            p = torch.softmax(x, dim=-1)  # (k, V)
            # logsumexp = max x - log max p (max p >= 1/V cannot underflow, unlike p[target]).
            lse = x.amax(dim=-1, keepdim=True) - torch.log(p.amax(dim=-1, keepdim=True))  # (k, 1)
            nll = lse - x.gather(1, t)  # (k, 1)
            total += (nll * valid[s : s + step, None]).sum()
            p.scatter_add_(1, t, p.new_full(t.shape, -1.0))  # softmax - one_hot = d loss_row / d logits
            rows = ignored[(ignored >= s) & (ignored < s + step)] - s
            grads.append(p.index_fill_(0, rows, 0.0))  # rows without a label add nothing
        ctx.save_for_backward(hidden, weight, count)
        ctx.grads, ctx.dtype = grads, logits.dtype
        ctx.set_materialize_grads(False)
        return logits, total / count

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor | None, grad_loss: torch.Tensor | None):
        hidden, weight, count = ctx.saved_tensors
        if grad_logits is None and grad_loss is None:
            return None, None, None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = ctx.dtype  # the matmul dtype of the forward (autocast may differ from the inputs')
        w, h = weight.to(dtype), hidden.to(dtype)
        # The loss term enters linearly: scale the (k, c) and (V, c) matmul outputs, not the (k, V) chunks.
        scale = grad_loss.float() / count if grad_loss is not None else None
        if grad_logits is not None and scale is not None:
            scale_in, scale = scale, None  # mixed: scale each chunk before adding grad_logits
        grad_h_parts, grad_w = [], None
        s = 0
        for chunk in ctx.grads:
            e = s + chunk.shape[0]
            if grad_logits is None:
                g = chunk
            elif grad_loss is None:
                g = grad_logits[s:e]
            else:
                g = torch.addcmul(grad_logits[s:e].float(), chunk, scale_in)
            g = g.to(dtype)
            if need_h:
                grad_h_parts.append(g @ w)  # (k, V) @ (V, c) -> (k, c)
            if need_w:
                part = g.t() @ h[s:e]  # (V, k) @ (k, c) -> (V, c)
                grad_w = part if grad_w is None else grad_w.add_(part)
            s = e
        grad_h = grad_w_out = None
        if need_h:
            grad_h = torch.cat(grad_h_parts)  # (N, c)
            grad_h = (grad_h * scale if scale is not None else grad_h).to(hidden.dtype)
        if need_w:
            grad_w_out = (grad_w.mul_(scale) if scale is not None else grad_w).to(weight.dtype)
        return grad_h, grad_w_out, None


AutoConfig.register(MMDecoderConfig.model_type, MMDecoderConfig)
AutoModel.register(MMDecoderConfig, MMDecoderModel)
AutoModelForCausalLM.register(MMDecoderConfig, MMDecoderForCausalLM)
