"""The interleaved sequence builder (DESIGN §2): a document of text and image segments -> tokens.

Layout::

    <bos> text… <boi> <h_H> <w_W> x_1 … x_{H·W} <eoi> text… <eos>

Segments are ``("text", str)`` or ``("image", codes)`` with ``codes`` a LongTensor ``(h, w)`` of
discrete codes, a LongTensor ``(h, w, G)`` of grouped codes (``G`` codes per position,
:mod:`ar_model.code_groups`) or a FloatTensor ``(h, w, c)`` of continuous latents, in raster
order (row-major). Any order of segments is allowed: caption→image (text-to-image) and
image→caption (image-to-text) are the two used for training. The size tokens come before the
image, so the positions and the number of image tokens are known before generation starts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ar_model.packing import IGNORE_INDEX
from ar_model.positions import Segment, multimodal_positions
from ar_model.text_tokenizer import TextTokenizer

TEXT, IMAGE = 0, 1  # modality values
IMAGE_OVERHEAD = 4  # <boi> <h> <w> … <eoi> around every image


@dataclass(frozen=True)
class Sequence:
    """One document as tokens; every tensor is per token ``(n, ...)`` except ``latents``."""

    input_ids: torch.Tensor  # (n,) long: text ids, offset image codes, or the continuous placeholder
    positions: torch.Tensor  # (n, 2) float: multimodal_positions(position_segments, scheme)
    modality: torch.Tensor  # (n,) long: 0 text, 1 image
    labels: torch.Tensor  # (n,) long: next token within the document, -100 at the end / before latents
    latents: torch.Tensor | None  # (n_latent_tokens, c) continuous latents in sequence order, else None
    code_groups: torch.Tensor | None  # (n_image_tokens, G) grouped codes in sequence order, else None
    image_spans: list[tuple[int, int, int]]  # (index of the first image token, h, w) per image
    position_segments: list[Segment]  # the ("text", n) / ("image", (h, w)) list behind positions

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def image_mask(self) -> torch.Tensor:
        """``(n,)`` bool: the image-token positions."""
        mask = torch.zeros(len(self), dtype=torch.bool, device=self.input_ids.device)
        for start, h, w in self.image_spans:
            mask[start : start + h * w] = True
        return mask

    def latent_mask(self) -> torch.Tensor:
        """``(n,)`` bool: positions that carry a continuous latent (a document's images are all of one
        kind)."""
        if self.latents is None:
            return torch.zeros(len(self), dtype=torch.bool, device=self.input_ids.device)
        return self.image_mask()

    def as_document(self) -> dict[str, torch.Tensor]:
        """Per-token tensors for :func:`ar_model.packing.build_packed_batch`.

        Continuous latents are scattered to ``latents (n, c)`` (zeros elsewhere) with a
        ``latent_mask (n,)``, grouped codes to ``code_groups (n, G)`` (zeros elsewhere), so that every
        value is per token.
        """
        doc = {
            "input_ids": self.input_ids,
            "positions": self.positions,
            "labels": self.labels,
            "modality": self.modality,
        }
        if self.latents is not None:
            mask = self.latent_mask()
            full = self.latents.new_zeros(len(self), self.latents.shape[-1])  # (n, c)
            full[mask] = self.latents
            doc["latents"] = full
            doc["latent_mask"] = mask
        if self.code_groups is not None:
            full = self.code_groups.new_zeros(len(self), self.code_groups.shape[-1])  # (n, G)
            full[self.image_mask()] = self.code_groups
            doc["code_groups"] = full
        return doc


def _check_image(value: object) -> tuple[torch.Tensor, str]:
    """Validate an image segment; return it and its kind: "continuous", "grouped" or "discrete"."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"an image segment holds a tensor, got {type(value).__name__}")
    if value.dtype == torch.bool:
        raise TypeError("image codes must be integers (discrete) or floats (continuous), not bool")
    if value.is_floating_point():
        if value.dim() != 3 or min(value.shape) < 1:
            raise ValueError(f"continuous latents must be (h, w, c), all >= 1, got {tuple(value.shape)}")
        return value, "continuous"
    if value.dim() not in (2, 3) or min(value.shape) < 1:
        raise ValueError(
            f"discrete codes must be (h, w) or grouped (h, w, G), all >= 1, got {tuple(value.shape)}"
        )
    if (value < 0).any():
        raise ValueError("discrete image codes must be non-negative")
    return value, "grouped" if value.dim() == 3 else "discrete"


def build_sequence(
    segments: list[tuple[str, str | torch.Tensor]],
    text_tokenizer: TextTokenizer,
    *,
    scheme: str = "rope_tv",
    code_offset: int | None = None,
    image_token_id: int | None = None,
    drop_caption: bool = False,
    max_len: int | None = None,
) -> Sequence:
    """Token ids, 2-D positions, modality and labels of one interleaved document.

    * discrete codes become ``code + code_offset`` (default ``text_tokenizer.vocab_size``: the shared
      vocabulary is text ids and specials first, then image codes);
    * continuous latents put ``image_token_id`` at their positions and are returned in ``latents``;
      labels that would predict such a placeholder are -100 (the diffusion head predicts latents);
    * grouped codes ``(h, w, G)`` likewise put ``image_token_id`` at their positions and are returned in
      ``code_groups`` (the code-group head predicts them);
    * ``drop_caption=True`` replaces every text segment by empty text (the unconditional rows of
      classifier-free guidance; the caller picks which documents, e.g. 10%); if the document then ends
      ``<eoi> <eos>``, that ``<eos>`` is not a target: up to ``<eoi>`` it reads exactly as an image→caption
      document, where a caption must follow (else, with 85% caption→image documents, 10% of them dropped,
      ``p(<eos> | image) ≈ 0.085 / (0.085 + 0.15) ≈ 0.36`` and captions come out empty);
    * with ``max_len``, an image grid that cannot fit (with <bos>, <eos> and its 4 specials) is a
      ValueError, and text beyond the remaining budget is cut from the end with a warning.
    """
    if code_offset is None:
        code_offset = text_tokenizer.vocab_size
    if code_offset < text_tokenizer.vocab_size:
        raise ValueError(
            f"code_offset={code_offset} would overlap the text ids [0, {text_tokenizer.vocab_size})"
        )
    tok = text_tokenizer
    # 1. Parse segments: text -> id lists, images -> validated tensors.
    parsed: list[tuple[str, object]] = []
    kinds: set[str] = set()  # per image: "continuous", "grouped" or "discrete"
    for seg in segments:
        if not isinstance(seg, tuple | list) or len(seg) != 2:
            raise ValueError(f"a segment is ('text', str) or ('image', tensor), got {seg!r}")
        kind, value = seg
        if kind == "text":
            if not isinstance(value, str):
                raise TypeError(f"a text segment holds a str, got {type(value).__name__}")
            parsed.append(("text", [] if drop_caption else tok.encode(value)))
        elif kind == "image":
            image, kind = _check_image(value)
            h, w = image.shape[0], image.shape[1]
            tok.h_token(h)  # raises if the tokenizer has no size token for h
            tok.w_token(w)
            if kind != "discrete" and image_token_id is None:
                raise ValueError(f"{kind} image tokens need image_token_id (the placeholder id for them)")
            parsed.append(("image", image))
            kinds.add(kind)
        else:
            raise ValueError(f"segment kind must be 'text' or 'image', got {kind!r}")
    if len(kinds) > 1:
        raise ValueError(f"a document's images are all of one kind, got {sorted(kinds)}")

    # 2. Length budget: images never shrink, text is cut from the end.
    if max_len is not None:
        fixed = 2 + sum(v.shape[0] * v.shape[1] + IMAGE_OVERHEAD for k, v in parsed if k == "image")
        if fixed > max_len:
            sizes = ", ".join(f"{v.shape[0]}x{v.shape[1]}" for k, v in parsed if k == "image")
            raise ValueError(
                f"image token grid(s) {sizes} need {fixed} tokens with <bos>/<eos> and "
                f"{IMAGE_OVERHEAD} specials per image, more than max_len={max_len}"
            )
        budget = max_len - fixed
        total_text = sum(len(v) for k, v in parsed if k == "text")
        if total_text > budget:
            warnings.warn(
                f"text of {total_text} tokens truncated to {budget} to fit max_len={max_len}",
                stacklevel=2,
            )
            cut: list[tuple[str, object]] = []
            for kind, value in parsed:
                if kind == "text":
                    value, budget = value[:budget], budget - len(value[:budget])
                cut.append((kind, value))
            parsed = cut

    # 3. Assemble ids, modality and the implied position segments.
    device = next((v.device for k, v in parsed if k == "image"), None)
    pieces: list[torch.Tensor] = []
    modality: list[torch.Tensor] = []
    pos_segments: list[Segment] = []
    latents: list[torch.Tensor] = []
    groups: list[torch.Tensor] = []
    spans: list[tuple[int, int, int]] = []
    text_run: list[int] = [tok.bos_id]  # text tokens since the last image
    cursor = 0  # tokens emitted before text_run

    def flush_text() -> None:
        nonlocal text_run, cursor
        pieces.append(torch.tensor(text_run, dtype=torch.long, device=device))
        modality.append(torch.full((len(text_run),), TEXT, dtype=torch.long, device=device))
        pos_segments.append(("text", len(text_run)))
        cursor += len(text_run)
        text_run = []

    for kind, value in parsed:
        if kind == "text":
            text_run.extend(value)
            continue
        h, w = value.shape[0], value.shape[1]
        text_run.extend([tok.boi_id, tok.h_token(h), tok.w_token(w)])
        flush_text()
        spans.append((cursor, h, w))
        if value.is_floating_point():
            latents.append(value.reshape(h * w, value.shape[2]))  # (h, w, c) -> (h*w, c), raster order
            ids = torch.full((h * w,), image_token_id, dtype=torch.long, device=device)
        elif value.dim() == 3:
            groups.append(value.reshape(h * w, value.shape[2]).to(torch.long))  # (h, w, G) -> (h*w, G)
            ids = torch.full((h * w,), image_token_id, dtype=torch.long, device=device)
        else:
            ids = value.reshape(h * w).to(torch.long) + code_offset  # (h, w) -> (h*w,), raster order
        pieces.append(ids)
        modality.append(torch.full((h * w,), IMAGE, dtype=torch.long, device=device))
        pos_segments.append(("image", (h, w)))
        cursor += h * w
        text_run = [tok.eoi_id]
    text_run.append(tok.eos_id)
    flush_text()

    input_ids = torch.cat(pieces)  # (n,)
    modality_t = torch.cat(modality)  # (n,)
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # (n,)
    labels[:-1] = input_ids[1:]
    if drop_caption and len(input_ids) > 1 and input_ids[-2] == tok.eoi_id:
        labels[-2] = IGNORE_INDEX  # the unconditional image's closing <eos> (see the docstring)
    latents_t = torch.cat(latents) if latents else None  # (n_latent_tokens, c)
    groups_t = torch.cat(groups) if groups else None  # (n_image_tokens, G)
    seq = Sequence(
        input_ids=input_ids,
        positions=multimodal_positions(pos_segments, scheme, device=input_ids.device),  # (n, 2)
        modality=modality_t,
        labels=labels,
        latents=latents_t,
        code_groups=groups_t,
        image_spans=spans,
        position_segments=pos_segments,
    )
    if latents_t is not None or groups_t is not None:  # the LM head never predicts a placeholder
        labels[:-1][seq.image_mask()[1:]] = IGNORE_INDEX
    return seq


def text_to_image_document(caption: str, image: torch.Tensor) -> list[tuple[str, str | torch.Tensor]]:
    """Segments of a caption→image document (text-to-image training and generation)."""
    return [("text", caption), ("image", image)]


def image_to_text_document(image: torch.Tensor, caption: str) -> list[tuple[str, str | torch.Tensor]]:
    """Segments of an image→caption document (image-to-text training and captioning)."""
    return [("image", image), ("text", caption)]
