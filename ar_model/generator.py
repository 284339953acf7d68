"""``MMGenerator``: a trained decoder with its text tokenizer and its frozen Stage-1 image tokenizer.

It is a transformers :class:`~transformers.PreTrainedModel`, so ``save_pretrained``,
``from_pretrained`` (a folder or a Hub repo id), ``push_to_hub``, ``.to(device)`` and the
pipelines of :mod:`pipelines` work on it as on any Hugging Face model. One folder holds everything::

    DIR/config.json, DIR/model.safetensors     the decoder (MMDecoderForCausalLM.save_pretrained)
    DIR/text_tokenizer.model                   the SentencePiece model
    DIR/image_tokenizer/                       the Stage-1 tokenizer (ImageTokenizer.save_pretrained)
    DIR/mm_generator.json                      manifest: the image tokenizer's fingerprint, the card data
    DIR/README.md, DIR/samples.png             the model card and its sample grid

The two user-facing operations are here, as plain tensor functions that pipelines wrap:
``text_to_image`` (caption → ``<boi> <h> <w>`` → sampled codes → decoded pixels) and
``image_to_text`` (``<bos> <boi> <h> <w> codes <eoi>`` → greedy or sampled caption). Everything
loads from safetensors, JSON and SentencePiece's own format; nothing is unpickled and no code from
the folder is run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, PreTrainedModel

from ar_model.code_groups import group_codes
from ar_model.config import MMDecoderConfig
from ar_model.generation import generate_image_codes, generate_tokens
from ar_model.latent_generation import generate_image_latents
from ar_model.model_card import SAMPLE_GRID_FILE, render_model_card
from ar_model.modeling import MMDecoderForCausalLM
from ar_model.positions import multimodal_positions
from ar_model.rerank import best_of, caption_scores
from ar_model.text_tokenizer import TextTokenizer
from tokenizers_mm.checkpoints import atomic_save_dir
from tokenizers_mm.hub import push_folder
from tokenizers_mm.identity import tokenizer_fingerprint
from tokenizers_mm.modeling import ImageTokenizer

TEXT_TOKENIZER_FILE = "text_tokenizer.model"
IMAGE_TOKENIZER_DIR = "image_tokenizer"
MANIFEST_FILE = "mm_generator.json"
MANIFEST_FORMAT = 1
# What a folder must hold (README.md and samples.png are documentation, not needed to load).
REQUIRED = ("config.json", "model.safetensors", TEXT_TOKENIZER_FILE, IMAGE_TOKENIZER_DIR, MANIFEST_FILE)


class ComponentMismatchError(ValueError):
    """A folder whose parts were not trained together (e.g. another image tokenizer than the decoder's)."""


def _batches(n: int, batch_size: int) -> list[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def check_prompts(prompts: Any) -> list[str]:
    """A prompt or a non-empty list of prompts, as a list of strings (a clear error otherwise)."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError('prompts is an empty list: give at least one prompt ("" is the unconditional one)')
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        item = prompts[bad[0]]
        raise TypeError(f"prompts must be strings; item {bad[0]} is a {type(item).__name__}: {item!r}")
    return list(prompts)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _resolve_folder(name_or_path: str | os.PathLike, **hub: Any) -> Path:
    """A local folder as is; otherwise a Hub repo id, fetched (or found in the cache) as one snapshot."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; an MMGenerator is a folder (or a Hub repo id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), repo_type="model", **hub))
    except Exception as e:  # network, auth, offline cache miss: say what was looked for
        raise OSError(
            f"{name_or_path!r} is neither a local folder nor a Hub model repo that can be fetched "
            f"({type(e).__name__}: {e})"
        ) from e


class MMGenerator(PreTrainedModel):
    """Decoder + text tokenizer + image tokenizer, with text-to-image and image-to-text.

    ``card`` holds what the model card records (training data, steps, metrics, ``sample_grid``:
    a PNG path copied into the folder as ``samples.png``); it is kept through save → load.
    """

    config_class = MMDecoderConfig
    base_model_prefix = "decoder"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(
        self,
        decoder: MMDecoderForCausalLM,
        text_tokenizer: TextTokenizer,
        image_tokenizer: ImageTokenizer,
        card: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(decoder.config)
        cfg, tok = decoder.config, text_tokenizer
        if cfg.text_vocab_size != tok.vocab_size:
            raise ComponentMismatchError(
                f"decoder expects {cfg.text_vocab_size} text ids, the text tokenizer has {tok.vocab_size}"
            )
        tok_cfg = image_tokenizer.config
        try:
            cfg.check_latent_dim(None if tok_cfg.is_discrete else tok_cfg.token_dim)
        except ValueError as e:
            raise ComponentMismatchError(str(e)) from None
        codebook = tok_cfg.codebook_size
        if codebook is not None and codebook != cfg.num_image_codes:
            raise ComponentMismatchError(
                f"decoder has {cfg.num_image_codes} image codes, the image tokenizer {codebook}"
            )
        if not tok_cfg.is_discrete and (tok_cfg.latent_mean is None or tok_cfg.latent_std is None):
            raise ComponentMismatchError(
                "a continuous image tokenizer needs its latent statistics (latent_mean/latent_std in its "
                "config) to normalize and denormalize the decoder's latents"
            )
        self.decoder = decoder
        self.image_tokenizer = image_tokenizer
        self.text_tokenizer = text_tokenizer
        self.card: dict[str, Any] = dict(card or {})
        self.eval()

    def forward(self, *args: Any, **kwargs: Any):
        """The decoder's forward (logits over the shared vocabulary); see :class:`MMDecoderForCausalLM`."""
        return self.decoder(*args, **kwargs)

    # ------------------------------------------------------------------ folder
    @property
    def resolution(self) -> int:
        """Image side in pixels that the decoder was trained on (the tokenizer's training size)."""
        return self.image_tokenizer.config.resolution

    @property
    def device(self) -> torch.device:
        return self.decoder.get_input_embeddings().weight.device

    def allowed_sizes(self) -> list[int]:
        """Image sides (pixels) the model can generate: multiples of the tokenizer's downsampling
        factor up to the decoder's largest grid. Only the training resolution was trained."""
        factor = self.resolution // self.image_tokenizer.token_grid(self.resolution, self.resolution)[0]
        return [factor * k for k in range(1, self.config.max_image_side + 1)]

    def manifest(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "image_tokenizer_fingerprint": tokenizer_fingerprint(self.image_tokenizer),
            "card": self.card,
        }

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        decoder_state_dict: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> Path:
        """Write every component into one folder, atomically (a temp folder renamed into place, so a
        crash leaves the previous folder intact), plus ``README.md``, the model card.

        ``decoder_state_dict`` replaces the decoder's own weights (the gathered full state dict of a
        sharded FSDP model). ``push_to_hub=True`` then uploads it (``repo_id=``, default the folder name).
        """
        if not is_main_process:
            return Path(save_directory)
        repo_id = kwargs.pop("repo_id", None)
        hub_kwargs = {k: kwargs.pop(k) for k in ("private", "token", "commit_message") if k in kwargs}
        kwargs.pop("safe_serialization", None)  # always safetensors
        if kwargs:
            raise TypeError(f"save_pretrained: unexpected arguments {sorted(kwargs)}")

        def write(tmp: Path) -> None:
            self.decoder.save_pretrained(tmp, state_dict=decoder_state_dict)
            self.text_tokenizer.save(tmp / TEXT_TOKENIZER_FILE)
            self.image_tokenizer.save_pretrained(tmp / IMAGE_TOKENIZER_DIR)
            card = dict(self.card)
            grid = card.pop("sample_grid", None)
            if grid is not None and Path(grid).is_file():
                shutil.copyfile(grid, tmp / SAMPLE_GRID_FILE)
            has_grid = (tmp / SAMPLE_GRID_FILE).is_file()
            manifest = {**self.manifest(), "card": card}
            manifest["text_tokenizer_sha256"] = _sha256(tmp / TEXT_TOKENIZER_FILE)
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
            (tmp / "README.md").write_text(render_model_card(self, card, has_grid))

        path = atomic_save_dir(save_directory, write)
        if push_to_hub:
            self.push_to_hub(repo_id or path.name, **hub_kwargs)
        return path

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
        **kwargs: Any,
    ):
        """Create ``repo_id`` (if needed) and upload the :meth:`save_pretrained` folder in one commit.

        Unlike transformers' generic ``push_to_hub`` this keeps our model card (with its metrics and
        sample grid) instead of replacing it. Returns the ``CommitInfo``.
        """
        if kwargs:
            raise TypeError(f"push_to_hub: unexpected arguments {sorted(kwargs)}")
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            return push_folder(
                folder,
                repo_id,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message or "Upload MMGenerator",
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> MMGenerator:
        """Load a folder written by :meth:`save_pretrained`, or a Hub repo id holding one.

        Loads safetensors, JSON and SentencePiece's own format only (nothing is unpickled, no code
        from the folder runs, so ``trust_remote_code`` is never needed). Every component must be
        present, and the image tokenizer must be the one the decoder was trained with (its
        fingerprint is in ``mm_generator.json``); otherwise a clear error names what is wrong.
        ``dtype``: e.g. ``torch.bfloat16`` for the decoder ("auto"/None: as saved, fp32).
        """
        # Arguments transformers.pipeline() and the Auto classes pass to every model class; none changes
        # what loads here.
        for key in (
            "_from_pipeline", "_from_auto", "trust_remote_code", "code_revision", "config", "use_safetensors",
        ):  # fmt: skip
            kwargs.pop(key, None)
        if kwargs.pop("adapter_kwargs", None):
            raise ValueError("MMGenerator folders carry no PEFT adapters (adapter_kwargs must be empty)")
        if kwargs.pop("proxies", None):
            raise ValueError("MMGenerator.from_pretrained takes no proxies: set HTTPS_PROXY instead")
        force_download = bool(kwargs.pop("force_download", False))
        subfolder = kwargs.pop("subfolder", None) or ""
        device_map = kwargs.pop("device_map", None)
        if kwargs:
            raise TypeError(f"MMGenerator.from_pretrained: unexpected arguments {sorted(kwargs)}")
        if device is None and isinstance(device_map, (str, torch.device)):
            device = device_map
        elif device_map is not None and not isinstance(device_map, (str, torch.device)):
            raise ValueError("MMGenerator loads on one device: pass device= (or device_map='cpu'/'cuda:0')")
        path = _resolve_folder(
            pretrained_model_name_or_path,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
        )
        if subfolder:  # a folder inside the local folder or the repo
            path = path / subfolder
            if not path.is_dir():
                raise FileNotFoundError(f"no subfolder {subfolder!r} in {pretrained_model_name_or_path}")
        missing = [name for name in REQUIRED if not (path / name).exists()]
        if missing:
            raise FileNotFoundError(
                f"{pretrained_model_name_or_path} is not a complete MMGenerator folder: missing {missing} "
                f"(a folder holds {list(REQUIRED)}; write one with MMGenerator.save_pretrained)"
            )
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(
                f"{path / MANIFEST_FILE}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}"
            )
        decoder_dtype = None if dtype in (None, "auto") else dtype
        decoder = MMDecoderForCausalLM.from_pretrained(
            path, use_safetensors=True, **({"dtype": decoder_dtype} if decoder_dtype is not None else {})
        )
        image_tokenizer = ImageTokenizer.from_pretrained(path / IMAGE_TOKENIZER_DIR, use_safetensors=True)
        expected = manifest.get("image_tokenizer_fingerprint")
        found = tokenizer_fingerprint(image_tokenizer)
        if expected != found:
            raise ComponentMismatchError(
                f"{path / IMAGE_TOKENIZER_DIR} is not the image tokenizer this decoder was trained with "
                f"(fingerprint {found[:12]}…, the decoder expects {str(expected)[:12]}…): its codes would "
                f"mean something else to the decoder"
            )
        sp_hash = manifest.get("text_tokenizer_sha256")
        if sp_hash is not None and sp_hash != _sha256(path / TEXT_TOKENIZER_FILE):
            raise ComponentMismatchError(
                f"{path / TEXT_TOKENIZER_FILE} is not the text tokenizer saved with this decoder"
            )
        card = dict(manifest.get("card") or {})
        if (path / SAMPLE_GRID_FILE).is_file():  # carried along when this model is saved or pushed again
            card["sample_grid"] = str(path / SAMPLE_GRID_FILE)
        gen = cls(decoder, TextTokenizer.load(path / TEXT_TOKENIZER_FILE), image_tokenizer, card)
        gen.name_or_path = str(pretrained_model_name_or_path)
        gen.config._name_or_path = str(pretrained_model_name_or_path)
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
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value not in self.allowed_sizes():
                sizes = self.allowed_sizes()
                raise ValueError(
                    f"{name}={value!r} is not an image size this model can generate: use a multiple of "
                    f"{sizes[0]} from {sizes[0]} to {sizes[-1]} (trained at {self.resolution})"
                )
        return self.image_tokenizer.token_grid(height, width)

    def image_generators(
        self,
        prompts: list[str],
        num_images_per_prompt: int,
        seed: int | torch.Generator | None,
        num_candidates: int = 1,
    ) -> list[torch.Generator]:
        """One generator per image, seeded from (seed, the prompt, the image's index for that prompt).

        So an image depends only on its own prompt and seed, never on what else is in the batch: a
        list of prompts gives the same images as one prompt at a time. A ``torch.Generator`` seed is
        advanced once (one draw) to derive the base seed. With ``num_candidates = C > 1`` each image gets
        ``C`` generators in a row (prompt-major, then image, then candidate); candidate 0 is seeded as
        the image itself is with ``C = 1``.
        """
        if isinstance(seed, torch.Generator):
            base = int(torch.randint(0, 2**62, (1,), generator=seed, device=seed.device).item())
        else:
            base = 0 if seed is None else int(seed)
        gens = []
        for prompt in prompts:
            for k in range(num_images_per_prompt):
                for c in range(num_candidates):
                    key = f"{base}\x00{k}\x00{prompt}" if c == 0 else f"{base}\x00{k}\x00{c}\x00{prompt}"
                    digest = hashlib.sha256(key.encode()).hexdigest()
                    gens.append(torch.Generator(self.device).manual_seed(int(digest[:15], 16)))
        return gens

    def prompt_ids(self, prompt: str, max_tokens: int) -> list[int]:
        """``<bos>`` + the prompt's ids, truncated (with a warning) to ``max_tokens``."""
        ids = [self.text_tokenizer.bos_id, *self.text_tokenizer.encode(prompt)]
        if len(ids) > max_tokens:
            warnings.warn(
                f"prompt of {len(ids)} tokens truncated to the {max_tokens} that fit the model's context "
                f"({self.config.max_position} tokens, image included): {prompt[:60]!r}",
                stacklevel=3,
            )
            ids = ids[:max_tokens]
        return ids

    @property
    def is_continuous(self) -> bool:
        """True when images are continuous latents sampled by the diffusion head."""
        return not self.image_tokenizer.config.is_discrete

    def text_to_tokens(self, prompts: str | list[str], **kwargs) -> torch.Tensor:
        """Image tokens for each prompt, prompt-major (``N * num_images_per_prompt`` of them), ready
        for :meth:`decode_tokens`: codes ``(M, h, w)`` of a discrete model, or raw (denormalized)
        latents ``(M, h, w, D)`` of a diffusion-head model. The empty caption is the unconditional
        branch of classifier-free guidance. Arguments as :meth:`text_to_token_candidates`.

        ``num_candidates = C > 1`` samples ``C`` candidates for every image and keeps the one whose
        prompt the model itself finds likeliest as its caption (self-reranking by :meth:`caption_scores`,
        :mod:`ar_model.rerank`); it costs ``C`` times the sampling plus one scoring pass. Candidate 0 is
        the image ``C = 1`` gives, and it wins ties.
        """
        tokens, scores = self.text_to_token_candidates(prompts, **kwargs)  # (M, C, ...), (M, C) or None
        return tokens[:, 0] if scores is None else best_of(tokens, scores)  # (M, ...)

    @torch.no_grad()
    def text_to_token_candidates(
        self,
        prompts: str | list[str],
        *,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float = 1.5,
        cfg_schedule: str = "constant",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        num_inference_steps: int = 4,
        sampler: str = "euler",
        guidance_interval: tuple[float, float] | None = None,
        seed: int | torch.Generator | None = 0,
        batch_size: int = 64,
        progress: bool = False,
        num_candidates: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every candidate's image tokens and their caption scores: ``tokens (M, C, h, w)`` codes or
        ``(M, C, h, w, D)`` raw latents, prompt-major (``M = N * num_images_per_prompt``), and ``scores
        (M, C)`` (:meth:`caption_scores`), or ``None`` with ``num_candidates = 1``. Candidate 0 of each
        image is the image plain sampling (``C = 1``) gives, so one best-of-``C`` pass also yields the
        plain samples (the main job judges both this way).

        ``top_k``/``top_p`` apply to discrete codes; ``num_inference_steps``, ``sampler``
        ("euler" | "heun") and ``guidance_interval`` (``(lo, hi)`` in flow time: guide only the head's
        steps that start inside it) to the diffusion head (1, 2 or 4 shortcut steps).
        """
        prompts = check_prompts(prompts)
        k = num_images_per_prompt
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"num_images_per_prompt must be an integer ≥ 1, got {k!r}")
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be ≥ 0 (1 = no guidance), got {guidance_scale}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be ≥ 0 (0 = greedy), got {temperature}")
        if guidance_interval is not None and not self.is_continuous:
            raise ValueError(
                "guidance_interval applies to the diffusion head's flow steps; "
                "this model samples discrete codes"
            )
        c = num_candidates
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"num_candidates must be an integer ≥ 1, got {c!r}")
        h, w = self._grid(height, width)
        gens = self.image_generators(prompts, k, seed, c)
        max_prompt = self.config.max_position - 3 - h * w  # <boi> <h> <w> and the image follow
        device = self.device
        rows = [
            torch.tensor(self.prompt_ids(p, max_prompt), dtype=torch.long, device=device)
            for p in prompts
            for _ in range(k * c)
        ]
        common = dict(guidance_scale=guidance_scale, cfg_schedule=cfg_schedule, temperature=temperature)
        out = []
        for part in _batches(len(rows), batch_size):
            if self.is_continuous:
                latents = generate_image_latents(
                    self.decoder,
                    rows[part],
                    h,
                    w,
                    num_inference_steps=num_inference_steps,
                    method=sampler,
                    guidance_interval=guidance_interval,
                    generator=gens[part],
                    progress=progress,
                    **common,
                )  # (b, h, w, D) normalized
                out.append(self.image_tokenizer.denormalize_latents(latents))
            else:
                codes = generate_image_codes(
                    self.decoder, rows[part], h, w, top_k=top_k, top_p=top_p, generator=gens[part],
                    progress=progress, **common,
                )  # fmt: skip
                out.append(codes)
        tokens = torch.cat(out)  # (N * k * c, h, w) or (N * k * c, h, w, D)
        scores = None
        if c > 1:
            scores = self.caption_scores(tokens, [p for p in prompts for _ in range(k * c)])  # (N * k * c,)
            scores = scores.view(-1, c)  # (N * k, c)
        return tokens.view(-1, c, *tokens.shape[1:]), scores  # (N * k, c, h, w[, D])

    @torch.no_grad()
    def caption_scores(
        self, tokens: torch.Tensor, captions: list[str], batch_tokens: int = 8192
    ) -> torch.Tensor:
        """How well each caption describes its image, by the model itself: ``(N,)`` mean log-probability of
        the caption's tokens (and ``<eos>``) after the image (CogView's Caption Score, in log; see
        :func:`ar_model.rerank.caption_scores`). ``tokens`` as :meth:`text_to_tokens` returns them (codes
        ``(N, h, w)`` or raw latents ``(N, h, w, D)``); :meth:`encode_images` makes them from pixels.
        """
        captions = check_prompts(captions)
        cfg = self.decoder.config
        if cfg.code_group > 1:
            tokens = group_codes(tokens, cfg.code_group)  # (N, h, w) -> (N, h/g, w/g, g*g)
        elif self.is_continuous:
            tokens = self.image_tokenizer.normalize_latents(tokens).to(self.decoder.dtype)  # (N, h, w, D)
        return caption_scores(self.decoder, self.text_tokenizer, tokens, captions, batch_tokens=batch_tokens)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codes ``(N, h, w)`` or raw latents ``(N, h, w, D)`` → uint8 pixels ``(N, 3, H, W)``.

        One image at a time: CPU convolutions round differently with the batch size (~1e-6 here),
        which can flip a pixel's uint8 rounding, and an image must not depend on what it was batched with.
        """
        pixels = torch.cat([self.image_tokenizer.decode(t[None]) for t in tokens])  # (N, 3, H, W) in [-1, 1]
        return pixels.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)

    def text_to_image(self, prompts: str | list[str], **kwargs) -> torch.Tensor:
        """uint8 images ``(N * num_images_per_prompt, 3, H, W)``; arguments as :meth:`text_to_tokens`."""
        return self.decode_tokens(self.text_to_tokens(prompts, **kwargs))

    # ------------------------------------------------------------------ image → text
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, 3, H, W)`` or floats in [-1, 1] → codes ``(N, h, w)`` / latents ``(N, h, w, D)``."""
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
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        tokens = self.encode_images(images)  # (N, h, w) codes or (N, h, w, D) raw latents
        cfg, tok = self.decoder.config, self.text_tokenizer
        if cfg.code_group > 1:
            tokens = group_codes(tokens, cfg.code_group)  # (N, h, w) -> (N, h/g, w/g, g*g)
        n, h, w = tokens.shape[:3]
        generator = self._generator(seed)
        device = tokens.device
        prefix = torch.tensor([tok.bos_id, tok.boi_id, tok.h_token(h), tok.w_token(w)], device=device)
        suffix = torch.tensor([tok.eoi_id], device=device)
        # <bos> <boi> <h> <w> | h*w codes | <eoi>: text 4, image (h, w), text 1
        positions = multimodal_positions(
            [("text", 4), ("image", (h, w)), ("text", 1)], cfg.rope_scheme, device=device
        )  # (4 + h*w + 1, 2)
        latents = latent_mask = groups = None
        if cfg.code_group > 1:
            image_ids = torch.full((n, h * w), cfg.group_token_id, dtype=torch.long, device=device)
            groups = torch.zeros(n, 4 + h * w + 1, cfg.codes_per_group, dtype=torch.long, device=device)
            groups[:, 4 : 4 + h * w] = tokens.reshape(n, h * w, -1)  # (N, h, w, G) -> (N, h*w, G)
        elif self.is_continuous:
            image_ids = torch.full((n, h * w), cfg.latent_token_id, dtype=torch.long, device=device)
            normed = self.image_tokenizer.normalize_latents(tokens).reshape(n, h * w, -1)  # (N, h*w, D)
            latents = torch.zeros(n, 4 + h * w + 1, normed.shape[-1], device=device)  # (N, 4 + h*w + 1, D)
            latents[:, 4 : 4 + h * w] = normed
            latent_mask = torch.zeros(n, 4 + h * w + 1, dtype=torch.bool, device=device)
            latent_mask[:, 4 : 4 + h * w] = True
        else:
            image_ids = tokens.reshape(n, h * w) + cfg.code_offset
        ids = torch.cat([prefix.expand(n, 4), image_ids, suffix.expand(n, 1)], dim=1)  # (N, 4 + h*w + 1)
        captions: list[str] = []
        for part in _batches(n, batch_size):
            rows = ids[part]
            out = generate_tokens(
                self.decoder,
                rows,
                positions.expand(rows.shape[0], -1, -1),
                max_new_tokens,
                prompt_latents=None if latents is None else latents[part].to(self.decoder.dtype),
                prompt_latent_mask=None if latent_mask is None else latent_mask[part],
                prompt_code_groups=None if groups is None else groups[part],
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )  # (b, max_new_tokens)
            for row in out.tolist():
                row = row[: row.index(cfg.eos_id)] if cfg.eos_id in row else row
                captions.append(tok.decode([t for t in row if t != cfg.pad_id]))
        return captions


# `AutoModelForImageTextToText.from_pretrained(DIR)` loads the whole folder (the decoder's own Auto
# entries are in ar_model.modeling); transformers 5's pipeline("image-to-text") looks here.
AutoModelForImageTextToText.register(MMDecoderConfig, MMGenerator, exist_ok=True)
