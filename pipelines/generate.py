"""Text-to-image from the shell::

    python -m pipelines.generate --model DIR_OR_REPO --prompt "a red circle" --out out.png \
        --num_images 4 --seed 0 [--guidance_scale 1.5] [--cfg_schedule constant|linear] [--temperature 1.0] \
        [--top_k K] [--top_p P] [--num_candidates C] [--height H --width W] [--upscale 4] [--device cpu]

It runs ``transformers.pipeline("text-to-image", model=...)`` and writes the images as one grid PNG
(each image upscaled ``--upscale`` times with nearest-neighbour, so 32-pixel images stay visible).
``--num_candidates C`` keeps, for each image, the best of ``C`` samples by the model's own caption score.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image


def _positive(kind: type, name: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a {kind.__name__}, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be ≥ 1, got {text}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Generate images from a prompt with an MMGenerator folder or Hub repo."
    )
    p.add_argument("--model", required=True, help="MMGenerator folder or Hub repo id")
    p.add_argument("--prompt", required=True, help='caption, e.g. "a red circle" ("" = unconditional)')
    p.add_argument("--out", required=True, help="PNG file for the grid of images")
    p.add_argument("--num_images", type=_positive(int, "--num_images"), default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance_scale", type=float, default=1.5)
    p.add_argument("--cfg_schedule", choices=["constant", "linear"], default="constant")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=_positive(int, "--top_k"), default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument(
        "--num_candidates", type=_positive(int, "--num_candidates"), default=1, help="best of C samples"
    )
    p.add_argument("--height", type=_positive(int, "--height"), default=None)
    p.add_argument("--width", type=_positive(int, "--width"), default=None)
    p.add_argument("--upscale", type=_positive(int, "--upscale"), default=4, help="nearest-neighbour factor")
    p.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    args = p.parse_args(argv)
    if Path(args.out).suffix.lower() != ".png":
        p.error(f"--out must be a .png file, got {args.out}")
    if args.guidance_scale < 0:
        p.error(f"--guidance_scale must be ≥ 0 (1 = no guidance), got {args.guidance_scale}")
    if args.temperature < 0:
        p.error(f"--temperature must be ≥ 0 (0 = greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top_p must be in (0, 1], got {args.top_p}")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    import math

    from transformers import pipeline

    import pipelines  # noqa: F401  (registers the task)
    from data.images import make_grid

    pipe = pipeline("text-to-image", model=args.model, device=args.device)
    results = pipe(
        args.prompt,
        num_images_per_prompt=args.num_images,
        generator=args.seed,
        guidance_scale=args.guidance_scale,
        cfg_schedule=args.cfg_schedule,
        num_candidates=args.num_candidates,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        height=args.height,
        width=args.width,
    )
    images = [r["image"] for r in results]
    images = [im.resize((im.width * args.upscale, im.height * args.upscale), Image.NEAREST) for im in images]
    grid = make_grid(images, nrow=int(math.ceil(math.sqrt(len(images)))))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    grid.save(tmp)
    tmp.replace(out)  # never a half-written PNG
    print(f"wrote {len(images)} image(s) for {args.prompt!r} → {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
