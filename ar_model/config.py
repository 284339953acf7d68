"""``MMDecoderConfig``: the typed configuration of the Stage-2 decoder (DESIGN §3).

It holds the Transformer's dimensions and the layout of the shared vocabulary (issue 3)::

    [0, text_vocab_size)                          text ids and specials (ar_model.text_tokenizer)
    [code_offset, code_offset + num_image_codes)  discrete image codes (code_offset >= text_vocab_size)
    [.., vocab_size)                              unused rows (e.g. padding the vocabulary to a multiple)

Generation reads the vocabulary layout from here: the image-code range to mask logits while an image
is generated, and ``h``/``w`` from the size tokens ``<h_k>``/``<w_k>``. Unknown keys raise, as in
:class:`tokenizers_mm.modeling.ImageTokenizerConfig`, instead of being silently kept.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ar_model.diffusion_head import DiffusionHeadConfig
from ar_model.flow_matching import FlowLossConfig
from ar_model.positions import SCHEMES
from ar_model.text_tokenizer import BOI_ID, BOS_ID, EOI_ID, EOS_ID, FIRST_SIZE_ID, PAD_ID, TextTokenizer
from tokenizers_mm.modeling import _BASE_CONFIG_KEYS

# "sdpa_per_doc": one causal SDPA call per document (CPU training default); "sdpa_dense_mask": one SDPA
# call with a block-diagonal ∧ causal boolean mask (reference); "flex": flex_attention with a block mask
# (GPU; forward only on CPU); "flash_varlen": flash_attn's varlen kernel (GPU, if installed).
ATTN_IMPLS: tuple[str, ...] = ("sdpa_per_doc", "sdpa_dense_mask", "flex", "flash_varlen")
# Attention among the tokens of one continuous image (DESIGN §2): "causal" raster order (next-token flow
# targets), or "bidirectional" within the image block (MAR-style masked prediction).
IMAGE_ATTENTIONS: tuple[str, ...] = ("causal", "bidirectional")


def swiglu_hidden_size(hidden_size: int, multiple_of: int = 32) -> int:
    """Llama's SwiGLU width: ``2/3 * 4 * hidden`` rounded up to a multiple (Touvron et al. 2023)."""
    n = int(2 * 4 * hidden_size / 3)
    return multiple_of * ((n + multiple_of - 1) // multiple_of)


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"MMDecoderConfig: {name} must be an int >= {minimum}, got {value!r}")
    return value


class MMDecoderConfig(PretrainedConfig):
    """Configuration of :class:`ar_model.modeling.MMDecoderForCausalLM`.

    Args:
        vocab_size: rows of the embedding and the LM head; default ``code_offset + num_image_codes``.
        hidden_size, num_layers, num_heads: Transformer width, depth and query heads.
        num_kv_heads: key/value heads (grouped-query attention, Ainslie et al. 2023); default ``num_heads``.
        head_dim: channels per head (even); default ``hidden_size // num_heads``.
        intermediate_size: SwiGLU width; default :func:`swiglu_hidden_size` of ``hidden_size``.
        rms_norm_eps: epsilon of every RMSNorm.
        rope_base: RoPE base ``theta_k = base^(-2k/d)``.
        rope_scheme: position rule, "rope_tv" | "mrope" | "flat" (:mod:`ar_model.positions`).
        qk_norm: RMSNorm over head_dim on q and k before RoPE (stabilises mixed-modal training,
            Chameleon Team 2024, arXiv:2405.09818).
        tie_embeddings: share the input embedding and the LM head (``tie_word_embeddings`` for transformers).
        max_position: longest sequence (prompt + generated tokens) the model accepts.
        initializer_range: std of the normal init of linear and embedding weights.
        gradient_checkpointing: recompute each decoder layer in backward (saves activation memory).
        attn_impl: attention kernel for packed rows, one of :data:`ATTN_IMPLS`.
        text_vocab_size: text ids and specials ``[0, text_vocab_size)``.
        num_image_codes: size of the image tokenizer's codebook.
        code_offset: id of image code 0; default ``text_vocab_size``.
        pad_id, bos_id, eos_id, boi_id, eoi_id: special token ids (the text tokenizer's fixed layout).
        size_token_start, max_image_side: ``<h_k>`` is ``size_token_start + k - 1`` and ``<w_k>`` is
            ``size_token_start + max_image_side + k - 1`` for ``k = 1..max_image_side``.
        latent_dim: channels of a continuous image token (issue 4); 0 (default) is a discrete-only model
            with no latent input layer and no diffusion head (its state dict is unchanged). With
            ``latent_dim > 0`` the image-code id ``code_offset`` is the placeholder of latent positions
            (:attr:`latent_token_id`), ``latent_proj`` embeds latents and ``diffusion_head`` predicts them.
        diffusion_head: :class:`~ar_model.diffusion_head.DiffusionHeadConfig` fields (a dict; defaults
            when None); only with ``latent_dim > 0``.
        flow_loss: :class:`~ar_model.flow_matching.FlowLossConfig` fields (a dict: loss weight, samples
            per position, t sampling, shortcut fraction); only with ``latent_dim > 0``.
        image_attention: "causal" (default): every token attends causally, and the head predicts the
            latent at ``i + 1`` from the hidden state at ``i``. "bidirectional" (``latent_dim > 0`` only):
            the tokens of one image block (a run of :attr:`latent_token_id` in a document) also see each
            other, and the head predicts the latents of the image positions whose input is masked (the
            placeholder: ``latent_mask`` false) from their own hidden states (MAR, Li et al. 2024).
        code_group: ``g``; with ``g > 1`` (discrete codes only) each image position holds the ``g × g``
            block of codes of a tokenizer grid ``g`` times finer (:mod:`ar_model.code_groups`): the
            input embeds their sum (``group_embed``), :class:`~ar_model.code_groups.CodeGroupHead`
            predicts them one after the other, and ``input_ids`` hold the placeholder
            :attr:`group_token_id` (``code_offset``) there. The LM head then covers the text ids and
            that placeholder only (default ``vocab_size = code_offset + 1``).
        code_group_width: hidden width of the MLP in each code-group head block; default ``2 * hidden_size``.
        code_group_layers: Transformer blocks of the code-group head (over a position's ``g²`` slots).
    """

    model_type = "mm_decoder"
    # transformers' generic names, for tools that read them (FSDP wrapping, benchmarks, ...)
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "num_key_value_heads": "num_kv_heads",
    }

    def __init__(
        self,
        vocab_size: int | None = None,
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int | None = None,
        rms_norm_eps: float = 1e-5,
        rope_base: float = 10000.0,
        rope_scheme: str = "rope_tv",
        qk_norm: bool = True,
        tie_embeddings: bool = False,
        max_position: int = 4096,
        initializer_range: float = 0.02,
        gradient_checkpointing: bool = False,
        attn_impl: str = "sdpa_per_doc",
        text_vocab_size: int = 1024,
        num_image_codes: int = 1024,
        code_offset: int | None = None,
        pad_id: int = PAD_ID,
        bos_id: int = BOS_ID,
        eos_id: int = EOS_ID,
        boi_id: int = BOI_ID,
        eoi_id: int = EOI_ID,
        size_token_start: int = FIRST_SIZE_ID,
        max_image_side: int = 64,
        latent_dim: int = 0,
        diffusion_head: dict[str, Any] | DiffusionHeadConfig | None = None,
        flow_loss: dict[str, Any] | FlowLossConfig | None = None,
        image_attention: str = "causal",
        code_group: int = 1,
        code_group_width: int | None = None,
        code_group_layers: int = 1,
        **kwargs: Any,
    ):
        unknown = sorted(set(kwargs) - _BASE_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"MMDecoderConfig: unknown key(s) {unknown}")
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.num_layers = _positive_int("num_layers", num_layers)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.num_kv_heads = _positive_int("num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"MMDecoderConfig: num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(
                    f"MMDecoderConfig: hidden_size={hidden_size} is not divisible by num_heads={num_heads}; "
                    f"set head_dim explicitly"
                )
            head_dim = hidden_size // num_heads
        self.head_dim = _positive_int("head_dim", head_dim, 2)
        if self.head_dim % 2:
            raise ValueError(f"MMDecoderConfig: head_dim must be even for RoPE, got {self.head_dim}")
        self.intermediate_size = _positive_int(
            "intermediate_size",
            swiglu_hidden_size(hidden_size) if intermediate_size is None else intermediate_size,
        )
        if not rms_norm_eps > 0 or not rope_base > 1 or not initializer_range > 0:
            raise ValueError(
                f"MMDecoderConfig: need rms_norm_eps > 0, rope_base > 1, initializer_range > 0; got "
                f"{rms_norm_eps}, {rope_base}, {initializer_range}"
            )
        self.rms_norm_eps = float(rms_norm_eps)
        self.rope_base = float(rope_base)
        self.initializer_range = float(initializer_range)
        if rope_scheme not in SCHEMES:
            raise ValueError(f"MMDecoderConfig: rope_scheme must be one of {SCHEMES}, got {rope_scheme!r}")
        self.rope_scheme = rope_scheme
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"MMDecoderConfig: attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.attn_impl = attn_impl
        self.qk_norm = bool(qk_norm)
        self.tie_embeddings = bool(tie_embeddings)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.max_position = _positive_int("max_position", max_position)

        # Vocabulary layout.
        self.text_vocab_size = _positive_int("text_vocab_size", text_vocab_size)
        self.num_image_codes = _positive_int("num_image_codes", num_image_codes)
        self.code_offset = _positive_int(
            "code_offset", text_vocab_size if code_offset is None else code_offset, text_vocab_size
        )
        self.code_group = _positive_int("code_group", code_group)
        lm_codes = 1 if self.code_group > 1 else self.num_image_codes  # grouped: the placeholder only
        self.vocab_size = _positive_int(
            "vocab_size",
            self.code_offset + lm_codes if vocab_size is None else vocab_size,
            self.code_offset + lm_codes,
        )
        self.code_group_width = _positive_int(
            "code_group_width", 2 * self.hidden_size if code_group_width is None else code_group_width
        )
        self.code_group_layers = _positive_int("code_group_layers", code_group_layers)
        self.max_image_side = _positive_int("max_image_side", max_image_side)
        self.size_token_start = _positive_int("size_token_start", size_token_start, 0)
        ids = {"pad_id": pad_id, "bos_id": bos_id, "eos_id": eos_id, "boi_id": boi_id, "eoi_id": eoi_id}
        for name, value in ids.items():
            setattr(self, name, _positive_int(name, value, 0))
        sizes = range(self.size_token_start, self.size_token_start + 2 * self.max_image_side)
        if sizes.stop > self.text_vocab_size:
            raise ValueError(
                f"MMDecoderConfig: size tokens [{sizes.start}, {sizes.stop}) exceed text_vocab_size="
                f"{self.text_vocab_size}"
            )
        for name, value in ids.items():
            if value >= self.text_vocab_size or value in sizes:
                raise ValueError(
                    f"MMDecoderConfig: {name}={value} must be a text id below text_vocab_size="
                    f"{self.text_vocab_size} outside the size tokens [{sizes.start}, {sizes.stop})"
                )
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"MMDecoderConfig: special ids must be distinct, got {ids}")

        # Continuous image tokens (issue 4). Stored as plain dicts so that config.json round-trips them.
        self.latent_dim = _positive_int("latent_dim", latent_dim, 0)
        if self.latent_dim == 0 and (diffusion_head is not None or flow_loss is not None):
            raise ValueError("MMDecoderConfig: diffusion_head / flow_loss need latent_dim > 0")
        self.diffusion_head = (
            DiffusionHeadConfig.from_any(diffusion_head).to_dict() if self.latent_dim else None
        )
        self.flow_loss = FlowLossConfig.from_any(flow_loss).to_dict() if self.latent_dim else None
        if (
            self.latent_dim
            and self.flow_loss["shortcut_fraction"] > 0
            and not self.diffusion_head["shortcut_levels"]
        ):
            raise ValueError(
                "MMDecoderConfig: flow_loss.shortcut_fraction > 0 needs diffusion_head.shortcut_levels > 0"
            )
        if image_attention not in IMAGE_ATTENTIONS:
            raise ValueError(
                f"MMDecoderConfig: image_attention must be one of {IMAGE_ATTENTIONS}, got {image_attention!r}"
            )
        if image_attention == "bidirectional" and not self.latent_dim:
            raise ValueError("MMDecoderConfig: image_attention='bidirectional' needs latent_dim > 0")
        self.image_attention = image_attention
        if self.code_group > 1 and self.latent_dim:
            raise ValueError("MMDecoderConfig: code_group > 1 groups discrete codes; latent_dim must be 0")
        super().__init__(**kwargs)

    # transformers ties lm_head to the embedding when config.tie_word_embeddings is true.
    @property
    def tie_word_embeddings(self) -> bool:
        return self.tie_embeddings

    @tie_word_embeddings.setter
    def tie_word_embeddings(self, value: bool) -> None:
        self.tie_embeddings = bool(value)

    # ------------------------------------------------------------------ continuous tokens
    @property
    def head_config(self) -> DiffusionHeadConfig | None:
        """The diffusion head's :class:`DiffusionHeadConfig`; None for a discrete model."""
        return DiffusionHeadConfig.from_any(self.diffusion_head) if self.latent_dim else None

    @property
    def flow_loss_config(self) -> FlowLossConfig | None:
        """The flow loss's :class:`FlowLossConfig`; None for a discrete model."""
        return FlowLossConfig.from_any(self.flow_loss) if self.latent_dim else None

    def check_latent_dim(self, dim: int | None, source: str = "the image tokenizer") -> None:
        """ValueError unless ``source``'s continuous tokens (``dim`` channels; None = discrete) fit this
        decoder's ``latent_dim`` (e.g. ``ImageTokenizerConfig.token_dim`` of a continuous or raw-patch
        tokenizer, checked when a decoder and its tokenizer are loaded together)."""
        want = self.latent_dim or None
        if dim != want:
            raise ValueError(
                f"latent dimension mismatch: the decoder takes {want or 'no'} continuous channels "
                f"(latent_dim={self.latent_dim}), {source} gives {dim or 'discrete codes'}"
            )

    @property
    def latent_token_id(self) -> int | None:
        """Placeholder id in ``input_ids`` at continuous-latent positions (image code 0); None if discrete."""
        return self.code_offset if self.latent_dim else None

    @property
    def codes_per_group(self) -> int:
        """Image codes per image position: ``code_group ** 2`` (1 for ungrouped codes and latents)."""
        return self.code_group**2

    @property
    def group_token_id(self) -> int | None:
        """Placeholder id in ``input_ids`` at grouped-code positions (``code_offset``); None unless
        ``code_group > 1``."""
        return self.code_offset if self.code_group > 1 else None

    # ------------------------------------------------------------------ vocabulary helpers
    @property
    def image_code_range(self) -> tuple[int, int]:
        """``[start, stop)`` of the image-code ids in the shared vocabulary."""
        return self.code_offset, self.code_offset + self.num_image_codes

    def h_token(self, h: int) -> int:
        """Id of ``<h_h>`` (image height in tokens)."""
        if not 1 <= h <= self.max_image_side:
            raise ValueError(f"image height {h} has no size token (1..{self.max_image_side})")
        return self.size_token_start + h - 1

    def w_token(self, w: int) -> int:
        """Id of ``<w_w>`` (image width in tokens)."""
        if not 1 <= w <= self.max_image_side:
            raise ValueError(f"image width {w} has no size token (1..{self.max_image_side})")
        return self.size_token_start + self.max_image_side + w - 1

    def size_from_tokens(self, h_id: int, w_id: int) -> tuple[int, int]:
        """``(h, w)`` from the ids of ``<h_h>`` and ``<w_w>``."""
        h = h_id - self.size_token_start + 1
        w = w_id - self.size_token_start - self.max_image_side + 1
        if not (1 <= h <= self.max_image_side and 1 <= w <= self.max_image_side):
            raise ValueError(f"({h_id}, {w_id}) are not (<h_k>, <w_k>) size token ids")
        return h, w


def vocab_layout(text_tokenizer: TextTokenizer, num_image_codes: int) -> dict[str, int]:
    """Vocabulary fields of :class:`MMDecoderConfig` for a trained text tokenizer and a codebook size."""
    tok = text_tokenizer
    return {
        "text_vocab_size": tok.vocab_size,
        "num_image_codes": num_image_codes,
        "code_offset": tok.vocab_size,
        "pad_id": tok.pad_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "boi_id": tok.boi_id,
        "eoi_id": tok.eoi_id,
        "size_token_start": tok.h_token(1),
        "max_image_side": tok.max_image_side,
    }
