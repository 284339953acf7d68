"""Stage 2: the interleaved decoder (see issue 3)."""

from ar_model.packing import PackPlan, TokenBatch, build_packed_batch, build_padded_batch, pack_documents
from ar_model.positions import document_positions, multimodal_positions
from ar_model.rope import apply_rope, rope_angles
from ar_model.sequence import Sequence, build_sequence, image_to_text_document, text_to_image_document
from ar_model.text_tokenizer import TextTokenizer, train_text_tokenizer

__all__ = [
    "PackPlan",
    "Sequence",
    "TextTokenizer",
    "TokenBatch",
    "apply_rope",
    "build_packed_batch",
    "build_padded_batch",
    "build_sequence",
    "document_positions",
    "image_to_text_document",
    "multimodal_positions",
    "pack_documents",
    "rope_angles",
    "text_to_image_document",
    "train_text_tokenizer",
]
