"""How much a trained Stage-2 decoder memorised: its losses on training samples vs held-out ones, per source.

    python benchmarks/stage2_generalization_gap.py --run DIR [--model DIR/final] [--n 256]

``--run`` is an ``ar_model.train`` output folder: its ``codes/train-i`` and ``codes/val-i`` folders
(written at start-up) hold the codes the decoder trained on and the held-out ones of the same sources.
For each source the first ``--n`` samples of both splits go through the validation loss of
``ar_model.train`` (every sample once as caption→image and once as image→caption, captions kept), so
``image`` is the cross-entropy of the codes given the caption and ``caption`` that of the caption given
the image. ``gap`` = held-out − train: a decoder that generalises fully has a gap near 0 (the held-out
scenes are new draws of the same generator); a growing gap means it is learning its training set
by heart instead, and more distinct training data (or fewer passes) is the remedy.

Prints one JSON line per source and a table. A continuous or grouped-code model is scored with its
own validation loss the same way (its keys differ).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch


def split_losses(
    model: Any, text_tok: Any, image_tok: Any, folder: Path, n: int, max_len: int
) -> dict[str, float]:
    """``ar_model.train.validation_loss`` on the first ``n`` samples of one codes folder."""
    from ar_model.code_groups import group_codes
    from ar_model.documents import CodesCorpus, eval_batches
    from ar_model.train import _load_all, validation_loss

    cfg = model.config
    codes, captions = _load_all([folder], image_tok)
    codes, captions = codes[:n], captions[:n]
    if cfg.code_group > 1:
        codes = group_codes(codes, cfg.code_group)  # (N, H, W) -> (N, H/g, W/g, g*g)
    corpus = CodesCorpus(codes, captions, text_tok, max_len)
    batches = eval_batches(
        corpus,
        max_len=max_len,
        tokens_per_batch=4 * max_len,
        scheme=cfg.rope_scheme,
        code_offset=cfg.code_offset,
        pad_id=cfg.pad_id,
    )
    with torch.no_grad():
        return validation_loss(model, batches, torch.device("cpu"))


def _source_name(folder: Path) -> str:
    from data.codes import read_codes_meta

    # an embedded source ("shapes") or the path of its shards (".../data/shapes"): the last part names it
    return Path(str(read_codes_meta(folder).get("extra_meta", {}).get("source", folder.name))).name


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from ar_model.generator import MMGenerator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="an ar_model.train output folder")
    parser.add_argument("--model", type=Path, default=None, help="MMGenerator folder (default RUN/final)")
    parser.add_argument("--n", type=int, default=256, help="samples per source and split")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    codes = args.run / "codes"
    train = sorted(codes.glob("train-*"), key=lambda p: int(p.name.split("-")[1]))
    val = sorted(codes.glob("val-*"), key=lambda p: int(p.name.split("-")[1]))
    pairs = [(t, v) for t in train for v in val if _source_name(t) == _source_name(v)]
    if not pairs:
        parser.error(f"{codes}: no source has both train-i and val-i codes folders")
    max_len = int(json.loads((args.run / "train_config.json").read_text())["max_len"])  # the run's rows
    gen = MMGenerator.from_pretrained(args.model or args.run / "final")
    model = gen.decoder.eval()
    rows = []
    for t, v in pairs:
        seen = split_losses(model, gen.text_tokenizer, gen.image_tokenizer, t, args.n, max_len)
        held = split_losses(model, gen.text_tokenizer, gen.image_tokenizer, v, args.n, max_len)
        row: dict[str, Any] = {"bench": "stage2_generalization_gap", "source": _source_name(t), "n": args.n}
        for key in seen:
            name = key.removeprefix("val_")
            row[f"train_{name}"] = round(seen[key], 4)
            row[f"heldout_{name}"] = round(held[key], 4)
            row[f"gap_{name}"] = round(held[key] - seen[key], 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = [k.removeprefix("gap_") for k in rows[0] if k.startswith("gap_")]
    print("\n| source | " + " | ".join(f"{k}: train / held-out (gap)" for k in keys) + " |")
    print("|---|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{r[f'train_{k}']:.3f} / {r[f'heldout_{k}']:.3f} ({r[f'gap_{k}']:+.3f})" for k in keys]
        print(f"| {r['source']} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
