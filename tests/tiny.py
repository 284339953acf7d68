"""Tiny models shared by the tests: real classes at sizes that train in seconds on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import torch

# A 4-level encoder/decoder with 8 base channels: the smallest conv autoencoder of the presets' shape.
TINY_TOKENIZER = dict(base_channels=8, channel_mult=[1, 2, 2], mid_blocks=0, norm_groups=4)


def save_tiny_tokenizer(path: str | Path, seed: int = 0, preset: str = "fsq-8x8") -> Path:
    """An untrained ``preset`` tokenizer at 32 px (FSQ: 1000 codes, 8×8 tokens) saved to ``path``."""
    from tokenizers_mm import ImageTokenizer
    from tokenizers_mm.presets import preset_config

    torch.manual_seed(seed)
    ImageTokenizer(preset_config(preset, resolution=32, **TINY_TOKENIZER)).save_pretrained(path)
    return Path(path)


TINY_DECODER = {"hidden_size": 64, "num_layers": 2, "num_heads": 2}


def tiny_train_config(tokenizer: str | Path, output_dir: str | Path, **overrides):
    """A Stage-2 ``TrainConfig`` that trains a 0.2M-parameter decoder for 30 steps in seconds."""
    from ar_model.train import TrainConfig

    base = dict(
        tokenizer=str(tokenizer),
        preset="tiny",
        model=dict(TINY_DECODER),
        train_data=["shapes", "digits"],
        train_num=160,
        val_data=["shapes"],
        val_num=16,
        max_len=256,
        tokens_per_batch=1024,
        max_steps=30,
        warmup_steps=3,
        lr=3e-3,
        log_every=1,
        eval_every=0,
        save_every=0,
        num_sample_prompts=4,
        output_dir=str(output_dir),
    )
    return TrainConfig(**{**base, **overrides})


def final_validation_batches(run: Path, max_len: int, tokens_per_batch: int):
    """A finished run's final decoder (eval mode) and its validation codes as ``eval_batches``."""
    from ar_model.documents import CodesCorpus, eval_batches
    from ar_model.generator import MMGenerator
    from ar_model.train import _load_all

    gen = MMGenerator.from_pretrained(run / "final")
    cfg = gen.decoder.config
    codes, captions = _load_all(sorted((run / "codes").glob("val-*")), gen.image_tokenizer)
    corpus = CodesCorpus(codes, captions, gen.text_tokenizer, max_len)
    batches = eval_batches(
        corpus,
        max_len=max_len,
        tokens_per_batch=tokens_per_batch,
        scheme=cfg.rope_scheme,
        code_offset=cfg.code_offset,
        pad_id=cfg.pad_id,
    )
    assert len(batches) >= 3  # so that shares of two or three processes differ
    return gen.decoder.eval(), batches


def validation_in_one_process(run: Path, max_len: int, tokens_per_batch: int) -> dict[str, float]:
    """``validation_loss`` of a finished run's final weights on its validation codes, in this process."""
    from ar_model.train import validation_loss

    model, batches = final_validation_batches(run, max_len, tokens_per_batch)
    return validation_loss(model, batches, torch.device("cpu"))
