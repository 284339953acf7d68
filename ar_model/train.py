"""Stage-2 training: the interleaved decoder on packed caption→image and image→caption documents.

    accelerate launch -m ar_model.train --config ar_model/configs/NAME.yaml [--tokenizer DIR] [--key value]

One linear ``main(cfg)``: setup → data → train loop → checkpoints → final folder + metrics.

* **Data.** Images come from embedded sources or dataset paths (``train_data``), encoded once by the
  frozen Stage-1 tokenizer ``--tokenizer DIR`` into ``output_dir/codes/`` (with the tokenizer's
  identity, reused on resume), or from codes pre-extracted by ``python -m data.extract_codes``
  (``codes_data``); either way the codes are loaded with an identity check, so codes from another
  tokenizer are an error, not garbage training. A SentencePiece model is trained on the captions
  and saved with the run. Documents are packed into rows of ``max_len`` (:mod:`ar_model.documents`);
  the data position is a pure function of the step, so ``--resume`` continues mid-epoch exactly.
* **Loop.** Gradient accumulation, cosine schedule with warm-up, optional EMA weights, non-finite
  steps skipped (all ranks agree), periodic validation loss and a sample grid PNG of text-to-image
  generations, atomic checkpoints.
* **Continuous tokens** (issue 4). With a continuous or raw-patch tokenizer the cache holds raw latents,
  normalized here with the per-channel stats stored in the tokenizer's config (a tokenizer without them
  is refused before any work). The decoder gets ``latent_dim`` = the tokenizer's token dimension, one
  image-code id (the latent placeholder) and a diffusion head (``--model.diffusion_head '{"width": 256}'``,
  ``--model.flow_loss '{"weight": 1.0}'``); its loss is text cross-entropy + weight · flow loss. The flow
  loss draws its noise and times from :func:`flow_generator` (a pure function of seed, micro-step and
  rank: resume stays bitwise exact, ranks draw different noise). In causal image attention every latent
  is a next-token target, as discrete codes are; with ``image_attention: bidirectional`` caption→image
  images are masked MAR-style (:func:`visible_latents`) and image→caption images stay whole inputs.
* **Output.** ``output_dir/final`` is an :class:`ar_model.generator.MMGenerator` folder (decoder,
  text tokenizer, image tokenizer) that loads with ``from_pretrained``; ``metrics.json`` beside it.

CPU default is fp32 (bf16 on these CPUs is 30–80× slower); pass ``--mixed_precision bf16`` to
``accelerate launch`` on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from ar_model.attention import doc_ids_from_seq_lens
from ar_model.code_groups import group_codes
from ar_model.config import MMDecoderConfig, vocab_layout
from ar_model.documents import I2T, T2I, CodesCorpus, PackedBatches, eval_batches
from ar_model.flow_matching import flow_matching_loss
from ar_model.generator import MMGenerator
from ar_model.image_blocks import image_block_ids, sample_visible_latents
from ar_model.modeling import MMDecoderForCausalLM
from ar_model.optim import OPTIMIZERS, build_optimizer
from ar_model.packing import IGNORE_INDEX, TokenBatch, join_rows
from ar_model.presets import PRESETS, preset_config
from ar_model.text_tokenizer import TextTokenizer, train_text_tokenizer
from tokenizers_mm.checkpoints import (
    atomic_write_text,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tokenizers_mm.config_io import ConfigError, check_keys, load_config, to_dict
from tokenizers_mm.distributed import finish_distributed
from tokenizers_mm.hub import push_checkpoint
from tokenizers_mm.modeling import ImageTokenizer, ImageTokenizerConfig
from tokenizers_mm.train import param_digest
from tokenizers_mm.train_step import NonfiniteGuard, check_finite_weights, ema_copy, guarded_update


@dataclass
class TrainConfig:
    """Everything a Stage-2 run needs; saved as ``train_config.json`` beside the outputs."""

    tokenizer: str = ""  # folder of the frozen Stage-1 image tokenizer (required)
    preset: str = "small"  # a name from ar_model.presets.PRESETS
    model: dict[str, Any] = field(default_factory=dict)  # overrides of MMDecoderConfig fields
    # embedded sources (shapes|digits) and/or dataset paths, encoded by the tokenizer at startup
    train_data: list[str] = field(default_factory=lambda: ["shapes"])
    train_num: int = 20000  # samples per source (a path is read up to this many)
    train_nums: list[int] = field(
        default_factory=list
    )  # per-source counts instead (same order as train_data)
    codes_data: list[str] = field(default_factory=list)  # folders written by python -m data.extract_codes
    val_data: list[str] = field(default_factory=lambda: ["shapes"])  # held-out sources (split "test")
    val_num: int = 256  # samples per validation source
    val_seed: int = 1_000_003  # embedded validation sets use a seed disjoint from training
    resolution: int = 32
    text_vocab_size: int = 600  # upper bound of the SentencePiece vocabulary (specials and bytes included)
    text_model_type: str = "bpe"  # "bpe" | "unigram"
    max_len: int = 512  # tokens per packed row
    tokens_per_batch: int = 4096  # token budget of one micro-batch per process
    # join each micro-batch's packed rows without their end padding (ar_model.packing.join_rows), so that
    # no step computes padding; with per-document attention (sdpa_per_doc, flash_varlen) only
    join_rows: bool = True
    t2i_fraction: float = 0.75  # share of documents in caption→image order (the rest image→caption)
    caption_drop: float = 0.1  # share of caption→image documents whose caption is dropped (for CFG)
    seed: int = 0
    grad_accum: int = 1
    max_steps: int = 2000  # optimizer steps
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.05  # on matrices only (not norms)
    optimizer: str = "adamw"  # "adamw" | "muon" (Muon on layer matrices, AdamW elsewhere: ar_model.optim)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # EMA of weights (0 disables); the final folder then holds the EMA weights and
    # final_raw/ the raw ones, and validation logs both (raw_val_loss, ...)
    output_dir: str = "runs/decoder"
    save_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 250  # validation loss every N steps (0: only at the end)
    sample_every: int = 0  # sample grid PNG every N steps (0: only at the end)
    num_sample_prompts: int = 16
    guidance_scale: float = 1.5  # for the sample grids (1.5 beat 1, 2, 3 and 5 on the shipped CPU model)
    temperature: float = 1.0
    top_k: int = 0  # 0 disables top-k
    num_inference_steps: int = 4  # continuous tokens: head (shortcut) steps per token in sample grids
    log_every: int = 25
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row
    allow_pipe: bool = False  # accept `pipe:CMD` dataset URLs (they run CMD in a shell)
    resume: bool = False
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = True
    hub_push_checkpoints: bool = False  # with push_to_hub: also upload each checkpoint (checkpoints/step-N)

    def __post_init__(self) -> None:
        if not self.tokenizer:
            raise ValueError("--tokenizer DIR (a trained Stage-1 image tokenizer folder) is required")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {self.preset!r}")
        if self.train_nums and (len(self.train_nums) != len(self.train_data) or min(self.train_nums) < 1):
            raise ValueError(
                f"train_nums must give a count ≥ 1 for each of the {len(self.train_data)} train_data "
                f"sources, got {self.train_nums}"
            )
        if not self.train_data and not self.codes_data:
            raise ValueError("give train_data (sources to encode) and/or codes_data (pre-extracted codes)")
        for name in (
            "grad_accum",
            "max_steps",
            "resolution",
            "train_num",
            "val_num",
            "log_every",
            "max_len",
            "max_nonfinite",
            "text_vocab_size",
            "num_inference_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in (
            "warmup_steps",
            "save_every",
            "eval_every",
            "sample_every",
            "top_k",
            "num_sample_prompts",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if self.tokens_per_batch < self.max_len:
            raise ValueError(f"tokens_per_batch={self.tokens_per_batch} must be ≥ max_len={self.max_len}")
        for name in ("t2i_fraction", "caption_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.text_model_type not in ("bpe", "unigram"):
            raise ValueError(f"text_model_type must be 'bpe' or 'unigram', got {self.text_model_type!r}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id user/name")
        if self.hub_push_checkpoints and not self.push_to_hub:
            raise ValueError("--hub_push_checkpoints needs --push_to_hub --hub_model_id user/name")
        self._check_inputs()

    def _check_inputs(self) -> None:
        """Sources, codes folders, tokenizer folder and model overrides, before any data is read."""
        from data.sources import check_source

        for source in self.train_data:
            check_source(source, self.allow_pipe, "train_data source")
        for source in self.val_data:
            check_source(source, self.allow_pipe, "val_data source")
        for folder in self.codes_data:
            if not (Path(folder) / "codes_meta.json").is_file():
                raise ValueError(
                    f"codes_data {folder!r} is not a codes directory (no codes_meta.json); "
                    "make one with `python -m data.extract_codes`"
                )
        if not (Path(self.tokenizer) / "config.json").is_file():
            raise ValueError(
                f"tokenizer {self.tokenizer!r} is not a saved Stage-1 tokenizer folder (no config.json)"
            )
        tok_config = ImageTokenizerConfig.from_pretrained(self.tokenizer)
        check_latent_stats(tok_config, self.tokenizer)
        # Unknown keys and impossible values of the decoder (the vocabulary is filled in at startup).
        check_keys(MMDecoderConfig, self.model)
        decoder = preset_config(
            self.preset, **{**image_layout(tok_config, self.tokenizer, self.model), **self.model}
        )
        decoder.check_latent_dim(None if tok_config.is_discrete else tok_config.token_dim)


def check_latent_stats(tok_config: ImageTokenizerConfig, where: str) -> None:
    """ValueError unless a continuous tokenizer config holds finite per-channel latent stats (std > 0):
    the decoder trains on, and generates, normalized latents."""
    if tok_config.is_discrete:
        return
    mean, std, dim = tok_config.latent_mean, tok_config.latent_std, tok_config.token_dim
    if mean is None or std is None:
        raise ValueError(
            f"{where} is a {tok_config.bottleneck} tokenizer without latent statistics (latent_mean/"
            "latent_std in its config.json); Stage 2 trains on normalized latents. tokenizers_mm.train "
            "stores them for a continuous tokenizer; otherwise compute them with "
            "tokenizers_mm.continuous.latent_stats on training latents, set config.latent_mean/latent_std "
            "and save_pretrained"
        )
    if len(mean) != dim or len(std) != dim:
        raise ValueError(
            f"{where}: latent_mean/latent_std need {dim} values each, got {len(mean)}/{len(std)}"
        )
    if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError(
            f"{where}: latent_mean must be finite and latent_std finite and > 0, got {mean}, {std}"
        )


CONTINUOUS_KEYS = ("latent_dim", "diffusion_head", "flow_loss")
LOSS_PARTS = ("text_loss", "flow_loss", "flow_matching_loss", "shortcut_loss")  # logged for continuous models
GROUP_LOSS_PARTS = ("text_loss", "code_loss")  # logged for grouped-code models


def image_layout(tok_config: ImageTokenizerConfig, where: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Decoder fields set by the image tokenizer: for continuous tokens ``latent_dim`` (its token
    dimension) and a single image-code id (the latent placeholder); nothing for discrete codes, whose
    codebook size the vocabulary layout carries."""
    if tok_config.is_discrete:
        given = [k for k in CONTINUOUS_KEYS if k in overrides]
        if given:
            raise ValueError(
                f"--model.{given[0]} applies to continuous image tokens; {where} is a discrete "
                f"{tok_config.bottleneck} tokenizer"
            )
        return {}
    return {"latent_dim": tok_config.token_dim, "num_image_codes": 1}


# Attention kernels for which one long row of documents costs what the same documents in several rows do
JOINABLE_ATTENTION = ("sdpa_per_doc", "flash_varlen")


def flow_generator(seed: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-step's flow-loss noise, times and image masks on one rank: a pure
    function of ``(seed, micro_step, rank)``, so a resumed run draws exactly what the uninterrupted run
    drew, and ranks (different data) also draw different noise."""
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + micro_step) * 65_537 + rank) % (1 << 63))
    return g


def visible_latents(
    input_ids: torch.Tensor,
    latent_mask: torch.Tensor,
    task: torch.Tensor,
    seq_lens: list[list[int]],
    latent_token_id: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``(b, n)`` bool: the latents given as input in a bidirectional-image step (MAR, Li et al. 2024,
    arXiv:2406.11838). Caption→image images are masked at a random ratio per image
    (:func:`~ar_model.image_blocks.sample_visible_latents`; the masked ones become the flow targets);
    image→caption images stay whole, an input only."""
    segments = doc_ids_from_seq_lens(seq_lens, input_ids.shape[1], input_ids.device)  # (b, n)
    blocks = image_block_ids(input_ids, latent_token_id, segments)  # (b, n)
    visible = sample_visible_latents(blocks, generator)  # (b, n)
    return latent_mask & torch.where(task == T2I, visible, torch.ones_like(visible))


# ----------------------------------------------------------------------------- data
def _codes_folders(accelerator: Accelerator, cfg: TrainConfig, tokenizer_dir: str, out_dir: Path) -> dict:
    """Encode the configured sources once (main process) into ``out_dir/codes``; return folders per split."""
    from data.extract_codes import extract_codes

    folders: dict[str, list[Path]] = {"train": [Path(p) for p in cfg.codes_data], "val": []}
    nums = cfg.train_nums or [cfg.train_num] * len(cfg.train_data)
    jobs = [("train", i, s, n, cfg.seed) for i, (s, n) in enumerate(zip(cfg.train_data, nums))]
    jobs += [("val", i, s, cfg.val_num, cfg.val_seed) for i, s in enumerate(cfg.val_data)]
    # The other ranks wait at the barrier below, so on CPU the main process may use their cores too.
    threads = torch.get_num_threads()
    if accelerator.device.type == "cpu":
        torch.set_num_threads(min(os.cpu_count() or 1, threads * accelerator.num_processes))
    try:
        for split, i, source, num, seed in jobs:
            folder = out_dir / "codes" / f"{split}-{i}"
            if accelerator.is_main_process and not _cached_codes_match(
                folder, source, num, cfg.resolution, seed
            ):
                extract_codes(
                    tokenizer=tokenizer_dir,
                    dataset=source,
                    num=num,
                    resolution=cfg.resolution,
                    out=folder,
                    split="train" if split == "train" else "test",
                    seed=seed,
                    overwrite=True,
                    progress=True,
                    device=accelerator.device,
                    allow_pipe=cfg.allow_pipe,
                )
            folders[split].append(folder)
    finally:
        torch.set_num_threads(threads)
    accelerator.wait_for_everyone()
    return folders


def _cached_codes_match(folder: Path, source: str, num: int, resolution: int, seed: int) -> bool:
    """Whether ``folder`` holds codes of exactly this request (the tokenizer is checked at load)."""
    from data.codes import read_codes_meta

    if not (folder / "codes_meta.json").is_file():
        return False
    extra = read_codes_meta(folder).get("extra_meta", {})
    wanted = {"requested": num, "resolution": resolution, "seed": seed}
    same_source = extra.get("source") in (source, str(Path(source).resolve()))
    return same_source and all(extra.get(k) == v for k, v in wanted.items())


def _load_all(folders: list[Path], tokenizer: ImageTokenizer) -> tuple[torch.Tensor, list[str]]:
    """Concatenate codes folders after checking each was made by this tokenizer: codes ``(N, h, w)``
    long, or continuous latents ``(N, h, w, D)`` normalized with the tokenizer's stored stats."""
    from data.codes import load_codes

    codes, captions = [], []
    for folder in folders:
        data = load_codes(folder, expect=tokenizer)
        if data.skips.total:
            print(f"{folder}: skipped {data.skips.total} unreadable samples ({data.skips.summary()})")
        if codes and data.tokens.shape[1:] != codes[0].shape[1:]:
            raise ValueError(
                f"{folder}: grid {tuple(data.tokens.shape[1:])} differs from {tuple(codes[0].shape[1:])}"
            )
        codes.append(data.tokens.float() if data.tokens.is_floating_point() else data.tokens.long())
        captions.extend(data.captions)
    tokens = torch.cat(codes)  # (N, h, w) or (N, h, w, D)
    if tokens.is_floating_point():
        tokens = tokenizer.normalize_latents(tokens)  # raw latents → zero mean, unit std per channel
    return tokens, captions


def _text_tokenizer(
    accelerator: Accelerator, cfg: TrainConfig, captions: list[str], out_dir: Path
) -> TextTokenizer:
    """Train the SentencePiece model on the training captions (main process), or reuse the run's."""
    path = out_dir / "text_tokenizer.model"
    if accelerator.is_main_process and not path.is_file():
        train_text_tokenizer(captions, path, cfg.text_vocab_size, cfg.text_model_type)
    accelerator.wait_for_everyone()
    return TextTokenizer.load(path)


def _to_device(batch: TokenBatch, device: torch.device) -> dict[str, Any]:
    t = batch.tensors
    inputs = {
        "input_ids": t["input_ids"].to(device),
        "positions": t["positions"].to(device),
        "labels": t["labels"].to(device),
        "doc_ids": batch.doc_ids.to(device),
        "seq_lens": batch.seq_lens,
    }
    if "latents" in t:  # continuous tokens: always passed, so the head sees a gradient on every rank
        inputs["latents"] = t["latents"].to(device)  # (rows, max_len, D)
        inputs["latent_mask"] = t["latent_mask"].to(device)  # (rows, max_len)
    if "code_groups" in t:
        inputs["code_groups"] = t["code_groups"].to(device)  # (rows, max_len, G)
    return inputs


def _model_inputs(
    batch: TokenBatch, model_cfg: MMDecoderConfig, device: torch.device, generator: torch.Generator | None
) -> dict[str, Any]:
    """Forward arguments of a training or validation step; continuous models also get the flow
    generator, and with bidirectional image attention the MAR-masked ``latent_mask``."""
    inputs = _to_device(batch, device)
    if model_cfg.latent_dim:
        inputs["flow_generator"] = generator
        if model_cfg.image_attention == "bidirectional":
            task = batch.tensors["task"].to(device)
            inputs["latent_mask"] = visible_latents(
                inputs["input_ids"],
                inputs["latent_mask"],
                task,
                batch.seq_lens,
                model_cfg.latent_token_id,
                generator,
            )
    return inputs


# ----------------------------------------------------------------------------- evaluation
Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a float64 vector over the processes


@torch.no_grad()
def validation_loss(
    model: MMDecoderForCausalLM,
    batches: list[TokenBatch],
    device: torch.device,
    share: tuple[int, int] = (0, 1),
    reduce: Reduce | None = None,
) -> dict:
    """Mean cross-entropy over all tokens, over image codes of caption→image documents, and over
    caption tokens (and ``<eos>``) of image→caption documents.

    Continuous models instead report ``val_flow_loss``, the flow-matching loss (``d = 0``, no shortcut
    rows) on the latents of caption→image documents with a generator seeded per batch (comparable
    between evaluations), ``val_text_loss`` (cross-entropy over all labels) and ``val_loss =
    val_text_loss + weight · val_flow_loss``.

    ``share = (rank, world)``: this process evaluates batches ``rank, rank + world, …`` and ``reduce``
    sums the loss sums and token counts over the processes, so that ``world`` processes split the work
    and all get the means over every batch (the same numbers as one process, up to float summation order).
    """
    cfg = model.config
    mine = [(i, batches[i]) for i in range(share[0], len(batches), share[1])]
    if cfg.latent_dim:
        return _continuous_validation_loss(model, mine, device, reduce)
    if cfg.code_group > 1:
        return _grouped_validation_loss(model, mine, device, reduce)
    sums = {"val_loss": 0.0, "val_image_loss": 0.0, "val_caption_loss": 0.0}
    counts = dict.fromkeys(sums, 0)
    for _, batch in mine:
        inputs = _to_device(batch, device)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits  # (rows, max_len, V)
        ce = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(labels)  # (rows, max_len)
        task = batch.tensors["task"].to(device)
        real = labels != IGNORE_INDEX
        masks = {
            "val_loss": real,
            "val_image_loss": real & (labels >= cfg.code_offset) & (task == T2I),
            "val_caption_loss": _caption_mask(cfg, inputs["input_ids"], labels, task),
        }
        for key, mask in masks.items():
            sums[key] += float(ce[mask].sum())
            counts[key] += int(mask.sum())
    return _means(sums, counts, reduce)


def _means(sums: dict[str, float], counts: dict[str, int], reduce: Reduce | None) -> dict[str, float]:
    """``sums[k] / counts[k]`` per key, with both first summed over the processes by ``reduce``."""
    keys = list(sums)
    totals = torch.tensor([sums[k] for k in keys] + [counts[k] for k in keys], dtype=torch.float64)
    if reduce is not None:
        totals = reduce(totals)
    n = len(keys)
    return {k: float(totals[i]) / max(float(totals[n + i]), 1.0) for i, k in enumerate(keys)}


def _caption_mask(cfg: MMDecoderConfig, ids: torch.Tensor, labels: torch.Tensor, task: torch.Tensor):
    """``(rows, max_len)`` bool: label positions of caption tokens (and ``<eos>``) of image→caption
    documents: not an image code, not after ``<bos>``/``<boi>``, not a size token."""
    prefix = torch.tensor([cfg.bos_id, cfg.boi_id], device=ids.device)
    size_tok = (ids >= cfg.size_token_start) & (ids < cfg.size_token_start + 2 * cfg.max_image_side)
    is_code = labels >= cfg.code_offset
    real = labels != IGNORE_INDEX
    return real & ~is_code & (task == I2T) & ~torch.isin(ids, prefix) & ~size_tok


def _grouped_validation_loss(
    model: MMDecoderForCausalLM,
    batches: list[tuple[int, TokenBatch]],
    device: torch.device,
    reduce: Reduce | None,
) -> dict:
    """:func:`validation_loss` of a grouped-code model: ``val_loss`` over text labels and every image code,
    ``val_image_loss`` per image code of caption→image documents (comparable with an ungrouped model's)."""
    cfg = model.config
    sums = {"val_loss": 0.0, "val_image_loss": 0.0, "val_caption_loss": 0.0}
    counts = dict.fromkeys(sums, 0)
    for _, batch in batches:
        inputs = _to_device(batch, device)
        labels = inputs.pop("labels")
        out = model(**inputs)
        ce = F.cross_entropy(
            out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(labels)  # (rows, max_len)
        task = batch.tensors["task"].to(device)
        ids, groups = inputs["input_ids"], inputs["code_groups"]
        at = ids == cfg.group_token_id  # (rows, max_len)
        # every image position's codes once, with whether its document is caption→image
        side = torch.cat([groups, task[..., None]], dim=-1)  # (rows, max_len, G + 1)
        cond, paired = model.flow_pairs(out.last_hidden_state, side, at, inputs["doc_ids"], batch.seq_lens)
        target, t2i = paired[:, :-1], paired[:, -1] == T2I  # (N, G), (N,)
        logits = model.group_head(cond, target)  # (N, G, K)
        code_ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none")  # (N*G,)
        code_ce = code_ce.view_as(target)  # (N, G)
        for key, rows in (("val_loss", slice(None)), ("val_image_loss", t2i)):
            sums[key] += float(code_ce[rows].sum())
            counts[key] += code_ce[rows].numel()
        for key, mask in (
            ("val_loss", labels != IGNORE_INDEX),
            ("val_caption_loss", _caption_mask(cfg, ids, labels, task)),
        ):
            sums[key] += float(ce[mask].sum())
            counts[key] += int(mask.sum())
    return _means(sums, counts, reduce)


def _continuous_validation_loss(
    model: MMDecoderForCausalLM,
    batches: list[tuple[int, TokenBatch]],
    device: torch.device,
    reduce: Reduce | None,
) -> dict:
    """:func:`validation_loss` of a continuous-token model."""
    cfg = model.config
    flow_cfg = dataclasses.replace(cfg.flow_loss_config, shortcut_fraction=0.0)
    generator = torch.Generator(device=device)
    sums = {"val_text_loss": 0.0, "val_flow_loss": 0.0, "val_caption_loss": 0.0}
    counts = dict.fromkeys(sums, 0)
    for index, batch in batches:
        generator.manual_seed(index)  # the batch's noise, whichever process evaluates it
        inputs = _model_inputs(batch, cfg, device, generator)
        labels = inputs.pop("labels")
        del inputs["flow_generator"]  # no loss inside the model: the parts are computed here
        out = model(**inputs)
        ce = F.cross_entropy(
            out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(labels)  # (rows, max_len)
        task = batch.tensors["task"].to(device)
        ids, latents, latent_mask = inputs["input_ids"], inputs["latents"], inputs["latent_mask"]
        t2i = task == T2I  # (rows, max_len)
        predict = None
        if cfg.image_attention == "bidirectional":  # the masked caption→image latents, as in training
            predict = (ids == cfg.latent_token_id) & ~latent_mask & t2i
        cond, target = model.flow_pairs(
            out.last_hidden_state, latents, latent_mask & t2i, inputs["doc_ids"], batch.seq_lens,
            predict_mask=predict,
        )  # fmt: skip
        if cond.shape[0]:
            flow = flow_matching_loss(model.diffusion_head, cond, target, flow_cfg, generator).flow
            sums["val_flow_loss"] += float(flow) * cond.shape[0]
            counts["val_flow_loss"] += cond.shape[0]
        for key, mask in (
            ("val_text_loss", labels != IGNORE_INDEX),
            ("val_caption_loss", _caption_mask(cfg, ids, labels, task)),
        ):
            sums[key] += float(ce[mask].sum())
            counts[key] += int(mask.sum())
    result = _means(sums, counts, reduce)
    weight = cfg.flow_loss_config.weight
    return {"val_loss": result["val_text_loss"] + weight * result["val_flow_loss"], **result}


def sample_prompts(n: int, seed: int = 0) -> list[str]:
    """Fixed held-out shapes prompts, cycling over the evaluation categories."""
    from data.shapes import EVAL_CATEGORIES, eval_prompts

    per = -(-n // len(EVAL_CATEGORIES)) if n else 0
    by_cat = [eval_prompts(c, per, seed) for c in EVAL_CATEGORIES]
    return [by_cat[i % len(by_cat)][i // len(by_cat)][0] for i in range(n)]


def sample_grid(
    gen: MMGenerator, prompts: list[str], cfg: TrainConfig, path: Path, write: bool = True
) -> None:
    from PIL import Image

    from data.images import make_grid

    images = gen.text_to_image(
        prompts,
        guidance_scale=cfg.guidance_scale,
        temperature=cfg.temperature,
        top_k=cfg.top_k or None,
        num_inference_steps=cfg.num_inference_steps,
    )  # (n, 3, H, W) uint8
    pils = [
        Image.fromarray(im.permute(1, 2, 0).cpu().numpy()).resize((im.shape[-1] * 4, im.shape[-2] * 4), 0)
        for im in images
    ]  # (3, H, W) -> (H, W, 3), upscaled ×4 (nearest) to be visible
    if not write:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(pils, nrow=int(math.ceil(math.sqrt(len(pils))))).save(path)


def training_card(cfg: TrainConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """What the model card records about this run: data, schedule and final numbers."""
    keys = ("steps", "tokens_seen", "train_time_s", "num_processes", "params", "image_tokens", "val_loss")
    keys += ("val_flow_loss",)  # continuous models
    return {
        "data": {
            "train_data": list(cfg.train_data),
            "train_num": list(cfg.train_nums) if cfg.train_nums else cfg.train_num,
            "codes_data": list(cfg.codes_data),
            "resolution": cfg.resolution,
        },
        "image_tokenizer": cfg.tokenizer,
        "preset": cfg.preset,
        "schedule": {
            "max_len": cfg.max_len,
            "tokens_per_batch": cfg.tokens_per_batch,
            "lr": cfg.lr,
            "t2i_fraction": cfg.t2i_fraction,
            "caption_drop": cfg.caption_drop,
        },
        **{k: metrics[k] for k in keys if k in metrics},
        "command": "accelerate launch -m ar_model.train " + " ".join(sys.argv[1:]),
    }


# ----------------------------------------------------------------------------- main
def main(cfg: TrainConfig) -> dict[str, Any]:
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum)
    set_seed(cfg.seed, device_specific=False)
    out_dir, is_main = Path(cfg.output_dir), accelerator.is_main_process
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    # FSDP shards the weights: every rank must join each forward (validation and sampling too), the
    # final weights are gathered with get_state_dict, and an EMA copy would need sharding of its own.
    collective = accelerator.distributed_type == DistributedType.FSDP
    if collective and cfg.optimizer == "muon":  # before any data work
        raise ValueError("optimizer muon orthogonalizes whole matrices; use DDP or one device, not FSDP")
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "train_config.json", json.dumps(to_dict(cfg), indent=2))
    # On the training device: the sample grids and the final generator decode with it.
    image_tokenizer = ImageTokenizer.from_pretrained(cfg.tokenizer, use_safetensors=True).eval().to(device)
    tok_config = image_tokenizer.config
    check_latent_stats(tok_config, cfg.tokenizer)

    # ---- data: codes (identity-checked), text tokenizer, packed batches
    folders = _codes_folders(accelerator, cfg, cfg.tokenizer, out_dir)
    codes, captions = _load_all(folders["train"], image_tokenizer)
    text_tok = _text_tokenizer(accelerator, cfg, captions, out_dir)
    layout = {
        **vocab_layout(text_tok, tok_config.codebook_size or 1),
        **image_layout(tok_config, cfg.tokenizer, cfg.model),
    }
    model_cfg = preset_config(cfg.preset, **{**layout, **cfg.model})
    model_cfg.check_latent_dim(None if tok_config.is_discrete else tok_config.token_dim)
    continuous, grouped = bool(model_cfg.latent_dim), model_cfg.code_group > 1
    if grouped:
        codes = group_codes(codes, model_cfg.code_group)  # (N, H, W) -> (N, H/g, W/g, g*g)
    corpus = CodesCorpus(codes, captions, text_tok, cfg.max_len)
    batch_args = dict(max_len=cfg.max_len, scheme=model_cfg.rope_scheme, code_offset=model_cfg.code_offset)
    batches = PackedBatches(
        corpus,
        tokens_per_batch=cfg.tokens_per_batch,
        pad_id=model_cfg.pad_id,
        rank=rank,
        world=world,
        seed=cfg.seed,
        t2i_fraction=cfg.t2i_fraction,
        caption_drop=cfg.caption_drop,
        **batch_args,
    )
    val_batches: list[TokenBatch] = []
    if folders["val"]:  # every process validates: under DDP each its share of the batches
        val_codes, val_captions = _load_all(folders["val"], image_tokenizer)
        if grouped:
            val_codes = group_codes(val_codes, model_cfg.code_group)  # (N, H/g, W/g, g*g)
        val_corpus = CodesCorpus(val_codes, val_captions, text_tok, cfg.max_len)
        val_batches = eval_batches(
            val_corpus, tokens_per_batch=cfg.tokens_per_batch, pad_id=model_cfg.pad_id, **batch_args
        )

    # ---- model and optimisation
    model = MMDecoderForCausalLM(model_cfg)
    # (equals presets.count_parameters for a discrete model; a continuous one adds latent_proj and the head)
    num_params = sum(p.numel() for p in model.parameters())
    kind = f"{corpus.latent_dim}-channel latents" if continuous else "codes"
    accelerator.print(
        f"decoder {cfg.preset}: {num_params / 1e6:.2f}M parameters, "
        f"{model_cfg.rope_scheme}; {len(corpus)} samples of {corpus.grid[0]}x{corpus.grid[1]} {kind}, "
        f"text vocab {text_tok.vocab_size}, "
        f"{batches.batches_per_epoch} batches/epoch/process"
    )
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.betas)
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the scaling.
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=cfg.warmup_steps * world,
        num_training_steps=cfg.max_steps * world,
        min_lr_rate=cfg.min_lr_ratio,
    )
    if collective and cfg.ema_decay > 0:
        raise ValueError("ema_decay > 0 is not supported with FSDP; use DDP or a single device for EMA")
    ema = None
    if cfg.ema_decay > 0:
        ema = ema_copy(model, cfg.ema_decay, accelerator.device)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, micro, tokens_seen, nonfinite_total = 0, 0, 0, 0
    if cfg.resume and (ckpt := latest_checkpoint(out_dir)) is not None:
        state, extras = load_checkpoint(accelerator, ckpt)
        step, micro = state["step"], state["micro_step"]
        tokens_seen, nonfinite_total = state.get("tokens_seen", 0), state.get("nonfinite_total", 0)
        if ema is not None and "ema" in extras:
            ema.load_state_dict(extras["ema"])
        accelerator.print(f"resumed from {ckpt} at step {step}")
    elif cfg.resume:
        accelerator.print(f"--resume: no checkpoint in {out_dir}/checkpoints, starting fresh")
    if is_main and step == 0:
        for stale in ("log.jsonl", "val_log.jsonl"):
            (out_dir / stale).unlink(missing_ok=True)

    def eval_model() -> MMDecoderForCausalLM:
        return ema.module if ema is not None else accelerator.unwrap_model(model)

    # DDP: each process validates its share of the batches on its unwrapped replica and the sums are
    # added up (2 processes: half the time, where rank 0 alone used to keep the others waiting). FSDP:
    # every forward is collective, so every process runs every batch.
    share = (0, 1) if collective else (rank, world)

    def reduce(totals: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(totals.to(device), reduction="sum").cpu()

    def val_losses() -> dict[str, float]:
        """Validation losses of the evaluated weights; with EMA also the raw weights' (``raw_`` keys), so
        that one run measures what the average adds. Every process must call it."""
        sum_up = reduce if world > 1 and not collective else None
        record = validation_loss(eval_model().eval(), val_batches, device, share, sum_up)
        if ema is not None:
            raw = validation_loss(accelerator.unwrap_model(model).eval(), val_batches, device, share, sum_up)
            record.update({f"raw_{k}": v for k, v in raw.items()})
        return record

    def log(name: str, record: dict) -> None:
        with open(out_dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    guard = NonfiniteGuard(cfg.max_nonfinite, nonfinite_total)
    prompts = sample_prompts(cfg.num_sample_prompts)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not is_main, desc="decoder", dynamic_ncols=True)
    t0, t_window, tok_window = time.time(), time.time(), 0
    model.train()
    joined = cfg.join_rows and model_cfg.attn_impl in JOINABLE_ATTENTION
    while step < cfg.max_steps:
        batch = batches.get(micro)
        if joined:
            batch = join_rows(batch, model_cfg.max_position, model_cfg.pad_id)  # rows of ≤ max_position
        generator = flow_generator(cfg.seed, micro, rank, device) if continuous else None
        inputs = _model_inputs(batch, model_cfg, device, generator)
        # trained tokens: labelled text/code tokens, plus the image positions of a continuous or
        # grouped-code model (their targets are the image head's)
        n_tokens = int((inputs["labels"] != IGNORE_INDEX).sum())
        if grouped:
            n_tokens += int((inputs["input_ids"] == model_cfg.group_token_id).sum())
        bad_latents = False
        if continuous:
            n_tokens += int(batch.tensors["latent_mask"].sum())
            # The model refuses non-finite latents with an error, which under DDP would leave the other
            # ranks waiting; instead such a batch runs on zeros and its loss is made NaN, so that the
            # guarded update skips the step on every rank and counts it.
            bad_latents = not bool(torch.isfinite(inputs["latents"]).all())
            if bad_latents:
                inputs["latents"] = torch.zeros_like(inputs["latents"])
        micro += 1
        with accelerator.accumulate(model):
            out = model(**inputs)
            loss = out.loss * float("nan") if bad_latents else out.loss
            # the parts of loss = text_loss + weight · flow_loss (not the logits: they would outlive the step)
            names = LOSS_PARTS if continuous else GROUP_LOSS_PARTS if grouped else ()
            parts = {k: getattr(out, k).detach() for k in names}
            del out
            bad = guarded_update(accelerator, loss, model.parameters(), optimizer, scheduler, cfg.grad_clip)
        tokens_seen += n_tokens * world
        tok_window += n_tokens * world
        if not accelerator.sync_gradients:
            continue
        step += 1
        bar.update(1)
        if guard.record(bad, step, accelerator.print):
            continue
        if ema is not None:
            ema.update_parameters(accelerator.unwrap_model(model))
        if is_main and (step % cfg.log_every == 0 or step == cfg.max_steps):
            now = time.time()
            record = {
                "step": step,
                "loss": float(loss.detach()),
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": round(tok_window / max(now - t_window, 1e-9), 1),
                "tokens_seen": tokens_seen,
                "elapsed_s": round(now - t0, 1),
            }
            record.update({k: float(v) for k, v in parts.items()})
            t_window, tok_window = now, 0
            log("log.jsonl", record)
            parts = {}
            if continuous:
                parts = {"text": f"{record['text_loss']:.3f}", "flow": f"{record['flow_loss']:.3f}"}
            elif grouped:
                parts = {"text": f"{record['text_loss']:.3f}", "code": f"{record['code_loss']:.3f}"}
            bar.set_postfix(loss=f"{record['loss']:.3f}", **parts, tok_s=f"{record['tokens_per_s']:.0f}")
        busy = (is_main or collective) and step < cfg.max_steps
        if step < cfg.max_steps and cfg.eval_every and step % cfg.eval_every == 0 and val_batches:
            record = {"step": step, **val_losses()}
            if is_main:
                log("val_log.jsonl", record)
            accelerator.print(
                f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step")
            )
            model.train()
        if busy and cfg.sample_every and step % cfg.sample_every == 0 and prompts:
            gen = MMGenerator(eval_model(), text_tok, image_tokenizer)
            path = out_dir / "samples" / f"step-{step:06d}.png"
            sample_grid(gen, prompts, cfg, path, write=is_main)
            model.train()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            extras = {"ema": {k: v.detach().clone() for k, v in ema.state_dict().items()}} if ema else None
            state = {
                "step": step,
                "micro_step": micro,
                "tokens_seen": tokens_seen,
                "nonfinite_total": guard.total,
            }
            check_finite_weights(accelerator, {"model": model, "ema": ema}, f"checkpoint step-{step}")
            ckpt = save_checkpoint(accelerator, out_dir, step, state, extras, keep=cfg.keep_checkpoints)
            if cfg.hub_push_checkpoints and accelerator.is_main_process:
                push_checkpoint(ckpt, cfg.hub_model_id, private=cfg.hub_private)
    bar.close()
    train_time = time.time() - t0

    # ---- final folder and metrics
    accelerator.wait_for_everyone()
    check_finite_weights(accelerator, {"model": model, "ema": ema}, "the final folder")
    # Replicas must hold identical weights after DDP training; record every rank's digest to prove it.
    # (FSDP shards differ by design; their full weights are gathered instead.)
    digests = [] if collective else gather_object([param_digest(accelerator.unwrap_model(model))])
    if len(set(digests)) > 1:
        accelerator.print(f"WARNING: parameters differ across processes: {digests}")
    full_state = accelerator.get_state_dict(model) if collective else None
    val_metrics = val_losses() if val_batches else {}
    metrics: dict[str, Any] = {}
    if is_main:
        final_model = eval_model().eval()
        gen = MMGenerator(final_model, text_tok, image_tokenizer)
        metrics = {
            **val_metrics,
            "steps": step,
            "train_time_s": round(train_time, 1),
            "tokens_seen": tokens_seen,
            "tokens_per_s": round(tokens_seen / max(train_time, 1e-9), 1),
            "params": num_params,
            "preset": cfg.preset,
            "image_tokens": (
                f"continuous ({model_cfg.latent_dim} channels)"
                if continuous
                else f"discrete, {model_cfg.code_group}x{model_cfg.code_group} codes per position"
                if grouped
                else "discrete"
            ),
            "rope_scheme": model_cfg.rope_scheme,
            "text_vocab_size": text_tok.vocab_size,
            "captions_truncated": corpus.num_truncated,
            "nonfinite_steps_skipped": guard.total,
            "num_processes": world,
            "rank_param_digests": digests,
        }
        if prompts:
            sample_grid(gen, prompts, cfg, out_dir / "samples" / "final.png")
            gen.card["sample_grid"] = str(out_dir / "samples" / "final.png")
        gen.card["training"] = training_card(cfg, metrics)
        gen.save_pretrained(out_dir / "final", decoder_state_dict=full_state)
        if ema is not None and not collective:
            # the final folder holds the EMA weights; the raw ones are kept beside it, loadable the same way
            raw_gen = MMGenerator(accelerator.unwrap_model(model).eval(), text_tok, image_tokenizer)
            raw_gen.card["training"] = gen.card["training"]
            raw_gen.save_pretrained(out_dir / "final_raw")
        atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
        accelerator.print(
            f"final: val loss {metrics.get('val_loss', float('nan')):.4f}, "
            f"{metrics['tokens_per_s']:.0f} tok/s "
            f"→ {out_dir / 'final'}"
        )
        if cfg.push_to_hub:
            gen.push_to_hub(cfg.hub_model_id, private=cfg.hub_private, commit_message=f"final, step {step}")
            accelerator.print(f"pushed {out_dir / 'final'} to the Hub: {cfg.hub_model_id}")
    model = optimizer = scheduler = None  # DDP wrapper before the process group (finish_distributed)
    finish_distributed(accelerator)
    return metrics


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(
        description="Train the Stage-2 decoder. Any TrainConfig field can be overridden with --key value "
        "(nested: --model.hidden_size 256).",
    )
    parser.add_argument("--config", type=str, default=None, help="YAML file with TrainConfig fields")
    args, rest = parser.parse_known_args(argv)
    try:
        return load_config(TrainConfig, args.config, rest)
    except (ConfigError, ValueError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
    sys.exit(0)
