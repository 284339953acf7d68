"""``MMGenerator``: a trained decoder with its text tokenizer and its frozen Stage-1 image tokenizer.

One folder holds all three (the layout the pipelines load)::

    DIR/config.json, DIR/model.safetensors     the decoder (MMDecoderForCausalLM.save_pretrained)
    DIR/text_tokenizer.model                   the SentencePiece model
    DIR/image_tokenizer/                       the Stage-1 tokenizer (ImageTokenizer.save_pretrained)

The two user-facing operations are here, as plain tensor functions that pipelines wrap:
``text_to_image`` (caption → ``<boi> <h> <w>`` → sampled codes → decoded pixels) and
``image_to_text`` (``<bos> <boi> <h> <w> codes <eoi>`` → greedy or sampled caption). Everything
loads from safetensors, JSON and SentencePiece's own format; nothing is unpickled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ar_model.generation import generate_image_codes, generate_tokens
from ar_model.modeling import MMDecoderForCausalLM
from ar_model.positions import multimodal_positions
from ar_model.text_tokenizer import TextTokenizer
from tokenizers_mm.modeling import ImageTokenizer

TEXT_TOKENIZER_FILE = "text_tokenizer.model"
IMAGE_TOKENIZER_DIR = "image_tokenizer"


def _batches(n: int, batch_size: int) -> list[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@dataclass
class MMGenerator:
    """Decoder + text tokenizer + image tokenizer, with text-to-image and image-to-text."""

    decoder: MMDecoderForCausalLM
    text_tokenizer: TextTokenizer
    image_tokenizer: ImageTokenizer

    def __post_init__(self) -> None:
        cfg, tok = self.decoder.config, self.text_tokenizer
        if cfg.text_vocab_size != tok.vocab_size:
            raise ValueError(
                f"decoder expects {cfg.text_vocab_size} text ids, the text tokenizer has {tok.vocab_size}"
            )
        codebook = self.image_tokenizer.config.codebook_size
        if codebook is not None and codebook != cfg.num_image_codes:
            raise ValueError(f"decoder has {cfg.num_image_codes} image codes, the image tokenizer {codebook}")
        self.decoder.eval()
        self.image_tokenizer.eval()

    # ------------------------------------------------------------------ folder
    @property
    def resolution(self) -> int:
        """Image side in pixels that the decoder was trained on (the tokenizer's training size)."""
        return self.image_tokenizer.config.resolution

    @property
    def device(self) -> torch.device:
        return self.decoder.get_input_embeddings().weight.device

    def to(self, device: torch.device | str) -> MMGenerator:
        self.decoder.to(device)
        self.image_tokenizer.to(device)
        return self

    def save(
        self, path: str | os.PathLike, decoder_state_dict: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Write the decoder, the text tokenizer and the image tokenizer into one folder.

        ``decoder_state_dict`` replaces the decoder's own weights (the gathered full state dict of a
        sharded FSDP model).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.decoder.save_pretrained(path, state_dict=decoder_state_dict, safe_serialization=True)
        self.text_tokenizer.save(path / TEXT_TOKENIZER_FILE)
        self.image_tokenizer.save_pretrained(path / IMAGE_TOKENIZER_DIR, safe_serialization=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> MMGenerator:
        """Load a folder written by :meth:`save` (safetensors + JSON + SentencePiece; no pickle)."""
        path = Path(path)
        missing = [
            name
            for name in ("config.json", TEXT_TOKENIZER_FILE, IMAGE_TOKENIZER_DIR)
            if not (path / name).exists()
        ]
        if missing:
            raise FileNotFoundError(f"{path} is not an MMGenerator folder: missing {missing}")
        decoder = MMDecoderForCausalLM.from_pretrained(path, use_safetensors=True)
        image_tokenizer = ImageTokenizer.from_pretrained(path / IMAGE_TOKENIZER_DIR, use_safetensors=True)
        gen = cls(decoder, TextTokenizer.load(path / TEXT_TOKENIZER_FILE), image_tokenizer)
        return gen.to(device) if device is not None else gen

    def _generator(self, seed: int | torch.Generator | None) -> torch.Generator:
        """``seed`` itself if it is a generator, else a new one on the model's device seeded with it."""
        if isinstance(seed, torch.Generator):
            return seed
        return torch.Generator(self.device).manual_seed(0 if seed is None else int(seed))

    # ------------------------------------------------------------------ text → image
    def _grid(self, height: int | None, width: int | None) -> tuple[int, int]:
        height = self.resolution if height is None else height
        width = self.resolution if width is None else width
        return self.image_tokenizer.token_grid(height, width)

    @torch.no_grad()
    def text_to_codes(
        self,
        prompts: list[str],
        *,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float = 1.5,
        cfg_schedule: str = "constant",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | torch.Generator | None = 0,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """Image codes ``(N, h, w)`` for each prompt; the empty caption is the unconditional branch."""
        if not self.image_tokenizer.config.is_discrete:
            raise NotImplementedError("continuous image tokens need the diffusion head (not in this model)")
        if isinstance(prompts, str):
            prompts = [prompts]
        h, w = self._grid(height, width)
        generator = self._generator(seed)
        tok, device = self.text_tokenizer, self.device
        rows = [torch.tensor([tok.bos_id, *tok.encode(p)], dtype=torch.long, device=device) for p in prompts]
        out = []
        for part in _batches(len(rows), batch_size):
            out.append(
                generate_image_codes(
                    self.decoder,
                    rows[part],
                    h,
                    w,
                    guidance_scale=guidance_scale,
                    cfg_schedule=cfg_schedule,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    generator=generator,
                )
            )
        return torch.cat(out) if out else torch.empty(0, h, w, dtype=torch.long, device=device)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(N, h, w)`` → uint8 pixels ``(N, 3, H, W)``."""
        pixels = self.image_tokenizer.decode(codes)  # (N, 3, H, W) in [-1, 1]
        return pixels.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)

    def text_to_image(self, prompts: list[str], **kwargs) -> torch.Tensor:
        """One uint8 image ``(N, 3, H, W)`` per prompt; keyword arguments as :meth:`text_to_codes`."""
        return self.decode_codes(self.text_to_codes(prompts, **kwargs))

    # ------------------------------------------------------------------ image → text
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, 3, H, W)`` (or float in [-1, 1]) → codes ``(N, h, w)``."""
        if images.dtype == torch.uint8:
            images = images.float().div(127.5).sub(1.0)
        return self.image_tokenizer.encode(images.to(self.device))

    @torch.no_grad()
    def image_to_text(
        self,
        images: torch.Tensor,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | torch.Generator | None = 0,
        batch_size: int = 64,
    ) -> list[str]:
        """A caption per image: greedy by default (``temperature=0``)."""
        if not self.image_tokenizer.config.is_discrete:
            raise NotImplementedError("continuous image tokens need the diffusion head (not in this model)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        codes = self.encode_images(images)  # (N, h, w)
        n, h, w = codes.shape
        cfg, tok = self.decoder.config, self.text_tokenizer
        generator = self._generator(seed)
        prefix = torch.tensor([tok.bos_id, tok.boi_id, tok.h_token(h), tok.w_token(w)], device=codes.device)
        suffix = torch.tensor([tok.eoi_id], device=codes.device)
        # <bos> <boi> <h> <w> | h*w codes | <eoi>: text 4, image (h, w), text 1
        positions = multimodal_positions(
            [("text", 4), ("image", (h, w)), ("text", 1)], cfg.rope_scheme, device=codes.device
        )  # (4 + h*w + 1, 2)
        ids = torch.cat(
            [prefix.expand(n, 4), codes.reshape(n, h * w) + cfg.code_offset, suffix.expand(n, 1)], dim=1
        )  # (N, 4 + h*w + 1)
        captions: list[str] = []
        for part in _batches(n, batch_size):
            rows = ids[part]
            out = generate_tokens(
                self.decoder,
                rows,
                positions.expand(rows.shape[0], -1, -1),
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )  # (b, max_new_tokens)
            for row in out.tolist():
                row = row[: row.index(cfg.eos_id)] if cfg.eos_id in row else row
                captions.append(tok.decode([t for t in row if t != cfg.pad_id]))
        return captions
