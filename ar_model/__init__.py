"""Stage 2: the interleaved decoder (see issue 3)."""

from ar_model.attention import KVCache
from ar_model.config import ATTN_IMPLS, IMAGE_ATTENTIONS, MMDecoderConfig, vocab_layout
from ar_model.diffusion_head import DiffusionHead, DiffusionHeadConfig
from ar_model.flow_matching import FlowLoss, FlowLossConfig, flow_matching_loss
from ar_model.flow_sampler import sample_flow
from ar_model.generation import generate_image_codes, generate_tokens, sample_logits
from ar_model.generator import MMGenerator
from ar_model.image_blocks import image_block_ids, sample_visible_latents
from ar_model.modeling import MMCausalLMOutput, MMDecoderForCausalLM, MMDecoderModel
from ar_model.packing import PackPlan, TokenBatch, build_packed_batch, build_padded_batch, pack_documents
from ar_model.positions import document_positions, multimodal_positions
from ar_model.presets import PRESETS, count_parameters, preset_config
from ar_model.rope import apply_rope, rope_angles
from ar_model.sequence import Sequence, build_sequence, image_to_text_document, text_to_image_document
from ar_model.text_tokenizer import TextTokenizer, train_text_tokenizer

__all__ = [
    "ATTN_IMPLS",
    "DiffusionHead",
    "DiffusionHeadConfig",
    "FlowLoss",
    "FlowLossConfig",
    "IMAGE_ATTENTIONS",
    "KVCache",
    "MMCausalLMOutput",
    "MMDecoderConfig",
    "MMDecoderForCausalLM",
    "MMDecoderModel",
    "MMGenerator",
    "PRESETS",
    "PackPlan",
    "Sequence",
    "TextTokenizer",
    "TokenBatch",
    "apply_rope",
    "build_packed_batch",
    "build_padded_batch",
    "build_sequence",
    "count_parameters",
    "document_positions",
    "flow_matching_loss",
    "generate_image_codes",
    "generate_tokens",
    "image_block_ids",
    "image_to_text_document",
    "multimodal_positions",
    "pack_documents",
    "preset_config",
    "rope_angles",
    "sample_flow",
    "sample_logits",
    "sample_visible_latents",
    "text_to_image_document",
    "train_text_tokenizer",
    "vocab_layout",
]
