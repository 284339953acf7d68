"""Tokenizer evaluation.

    python -m tokenizers_mm.evaluate --model DIR --dataset shapes|digits|photos|PATH --out metrics.json

Reports PSNR and SSIM of reconstructions (held-out data) and, for discrete tokenizers, codebook
usage (% of codes used on the eval set) and perplexity, plus bits per image.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tokenizers_mm.metrics import codebook_stats, psnr, ssim
from tokenizers_mm.modeling import ImageTokenizer


@torch.no_grad()
def evaluate_tokenizer(model: ImageTokenizer, images: torch.Tensor, batch_size: int = 256) -> dict[str, Any]:
    """Metrics of ``model`` on uint8 images (N, 3, H, W) (or float in [-1, 1])."""
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    psnrs, ssims = [], []
    counts = torch.zeros(model.config.codebook_size or 1, dtype=torch.long)
    grid = None
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        x = (x.float() / 127.5 - 1.0) if x.dtype == torch.uint8 else x.float()
        x = x.to(device)
        tokens = model.encode(x)
        recon = model.decode(tokens)
        psnrs.append(psnr(recon, x).cpu())
        ssims.append(ssim(recon, x).cpu())
        grid = tuple(tokens.shape[1:3])
        if model.config.is_discrete:
            counts += torch.bincount(tokens.flatten().cpu(), minlength=counts.numel())
    out: dict[str, Any] = {
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "num_images": len(images),
        "token_grid": list(grid) if grid else None,
        "bottleneck": model.config.bottleneck,
    }
    if model.config.is_discrete:
        out.update(codebook_stats(counts))
        out["codebook_size"] = model.config.codebook_size
        out["bits_per_image"] = grid[0] * grid[1] * math.log2(model.config.codebook_size)
    return out


@torch.no_grad()
def judge_reconstructions(
    model: ImageTokenizer, n_per_category: int = 100, resolution: int = 32, seed: int = 0
) -> dict[str, float]:
    """The judge's accuracy per shapes category on reconstructions of the Stage-2 evaluation scenes.

    Renders the reference scene of each ``data.shapes.eval_prompts`` prompt, encodes and decodes it, and
    judges the reconstruction against the prompt: the ceiling a decoder trained on these tokens can reach
    (a perfect tokenizer scores 1.0 everywhere). Keys: the categories and "overall" (their mean).
    """
    from data.images import pil_to_tensor
    from data.shapes import EVAL_CATEGORIES, eval_prompts, judge, render_scene

    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    scores: dict[str, float] = {}
    for category in EVAL_CATEGORIES:
        prompts = eval_prompts(category, n_per_category, seed, resolution)
        x = torch.stack([pil_to_tensor(render_scene(spec)) for _, spec in prompts])  # (n, 3, R, R) in [-1, 1]
        recon = model.decode(model.encode(x.to(device))).cpu()
        hits = [judge(r, spec).score(category) for r, (_, spec) in zip(recon, prompts)]  # judge takes [-1, 1]
        scores[category] = sum(hits) / len(hits)
    scores["overall"] = sum(scores.values()) / len(scores)
    return scores


@torch.no_grad()
def reconstruction_grid(model: ImageTokenizer, images: torch.Tensor, scale: int = 4) -> Image.Image:
    """Two rows per group: originals above, reconstructions below, upscaled ×``scale`` (nearest)."""
    from data.images import make_grid, tensor_to_pil

    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    x = (images.float() / 127.5 - 1.0) if images.dtype == torch.uint8 else images.float()
    recon = model.decode(model.encode(x.to(device))).cpu()
    n = len(x)
    per_row = min(8, n)
    tiles = []
    for start in range(0, n, per_row):
        row_x, row_r = x[start : start + per_row], recon[start : start + per_row]
        tiles += [tensor_to_pil(t) for t in row_x] + [tensor_to_pil(t) for t in row_r]
    grid = make_grid(tiles, nrow=per_row)
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from data.sources import EMBEDDED, images_tensor

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", required=True, help="folder written by training (ImageTokenizer.save_pretrained)"
    )
    p.add_argument("--dataset", required=True, help=f"one of {list(EMBEDDED)} or a dataset path")
    p.add_argument("--out", required=True, help="metrics.json to write")
    p.add_argument("--num", type=int, default=512, help="number of evaluation images")
    p.add_argument(
        "--resolution", type=int, default=None, help="defaults to the tokenizer's training resolution"
    )
    p.add_argument("--seed", type=int, default=1_000_003, help="seed of the embedded held-out set")
    p.add_argument("--grid", type=str, default=None, help="optional PNG of originals vs reconstructions")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error(f"--num must be ≥ 1, got {args.num}")
    if not Path(args.model).is_dir():
        p.error(f"--model {args.model} is not a folder")
    model = ImageTokenizer.from_pretrained(args.model)
    res = args.resolution or model.config.resolution
    if res % model.config.downsample_factor:
        p.error(f"--resolution must be a multiple of {model.config.downsample_factor}, got {res}")
    images, skips = images_tensor(args.dataset, num=args.num, resolution=res, seed=args.seed)
    metrics = evaluate_tokenizer(model, images)
    metrics["dataset"] = args.dataset
    metrics["resolution"] = res
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(metrics, indent=2))
    if args.grid:
        reconstruction_grid(model, images[:32]).save(args.grid)
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
