"""Diffusion head: 1/2/4-step shortcut sampling against 50-step Euler, side by side (issues 4, 6).

    python benchmarks/bench_diffusion_head.py --model runs/decoder_kl/final            # a trained folder
    python benchmarks/bench_diffusion_head.py --model DIR --steps 1 2 4 8 --n_per_category 100
    python benchmarks/bench_diffusion_head.py --model DIR --guidance_scale 4 --temperature 1.2 \
        --shortcut 1:2.0:1.0 2:2.0:1.2 4:4.0:1.2          # each few-step row at its own CFG / temperature
    python benchmarks/bench_diffusion_head.py --model DIR --guidance_scale 4 --temperature 1.2 \
        --shortcut 2:4.0:1.2:0.5-1           # ... guiding only the flow steps that start in [0.5, 1)
    python benchmarks/bench_diffusion_head.py --quick                                  # CI: random model

For each setting the same prompts (the judge's shapes categories, ``--n_per_category`` each) are
generated from the same seeds with ``MMGenerator.text_to_image(num_inference_steps=N,
sampler=...)``, the baseline at ``--guidance_scale`` / ``--temperature``, the shortcut rows at the same
or, with ``--shortcut STEPS:CFG:TEMPERATURE[:LO-HI]``, each at its own (a full-size step extrapolates the
guided velocity further, so few-step sampling may want a lower CFG), optionally guiding only the flow
steps that start in ``[LO, HI)`` (``guidance_interval``). Measured in one process, settings
alternating over ``--repeats`` rounds:

* ``head_ms_per_token``: wall time inside the flow sampler (every head call of one image token,
  CFG rows included) per generated image token, median over rounds;
* ``s_per_image``: wall time of the whole generation (decoder trunk + head + image decoder);
* ``head_speedup`` / ``speedup``: the 50-step Euler baseline's times divided by the setting's;
* the judge's scores per category (from the first round: every round samples the same images).

Prints a table and one JSON line ``{"bench": "diffusion_head", ...}``. ``--quick`` builds an
untrained tiny continuous model, so its scores are meaningless; only the timings are real.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import emit_json

import ar_model.latent_generation as latent_generation
from ar_model.evaluate import EVAL_CATEGORIES, evaluate_text_to_image
from ar_model.flow_sampler import check_guidance_interval
from ar_model.generator import MMGenerator

BASELINE = {"name": "euler-50", "steps": 50, "sampler": "euler"}


class HeadTimer:
    """Wraps the sampler that :mod:`ar_model.latent_generation` calls, adding up its wall time."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._inner = latent_generation.sample_flow

    def __enter__(self) -> HeadTimer:
        def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
            t0 = time.perf_counter()
            try:
                return self._inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        latent_generation.sample_flow = timed
        return self

    def __exit__(self, *exc: object) -> None:
        latent_generation.sample_flow = self._inner


def parse_shortcut(text: str) -> dict[str, Any]:
    """``"2:2.0:1.2"`` → ``{"steps": 2, "guidance_scale": 2.0, "temperature": 1.2}``; a fourth field
    ``LO-HI`` adds ``"guidance_interval": (LO, HI)``."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"{text!r} is not STEPS:CFG:TEMPERATURE[:LO-HI]")
    steps, cfg, temperature = int(parts[0]), float(parts[1]), float(parts[2])
    if steps < 1 or cfg < 0 or temperature <= 0:
        raise ValueError(f"{text!r}: need STEPS >= 1, CFG >= 0 and TEMPERATURE > 0")
    row = {"steps": steps, "guidance_scale": cfg, "temperature": temperature}
    if len(parts) == 4:
        bounds = parts[3].split("-")
        if len(bounds) != 2:
            raise ValueError(f"{text!r}: the guidance interval is LO-HI, e.g. 0.5-1")
        row["guidance_interval"] = check_guidance_interval((float(bounds[0]), float(bounds[1])))
    return row


def tiny_random_model(folder: Path) -> Path:
    """An untrained continuous model (kl-8x8 tokenizer with unit stats, tiny decoder) for --quick."""
    from ar_model.config import vocab_layout
    from ar_model.modeling import MMDecoderForCausalLM
    from ar_model.presets import preset_config
    from ar_model.text_tokenizer import train_text_tokenizer
    from data.shapes import generate_shapes
    from tokenizers_mm import ImageTokenizer
    from tokenizers_mm.presets import preset_config as tokenizer_preset

    torch.manual_seed(0)
    tok_cfg = tokenizer_preset("kl-8x8", resolution=32, base_channels=8, channel_mult=[1, 2, 2], mid_blocks=0)
    image_tok = ImageTokenizer(tok_cfg)
    dim = tok_cfg.token_dim
    image_tok.config.latent_mean, image_tok.config.latent_std = [0.0] * dim, [1.0] * dim
    captions = [s.caption for s in generate_shapes(200, resolution=32, seed=0)]
    text_tok = train_text_tokenizer(captions, None, vocab_size=600)
    cfg = preset_config(
        "tiny", hidden_size=64, num_layers=2, num_heads=2, latent_dim=dim, **vocab_layout(text_tok, 1)
    )
    return MMGenerator(MMDecoderForCausalLM(cfg), text_tok, image_tok).save_pretrained(folder)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a continuous-token MMGenerator folder or Hub repo id")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="shortcut step counts")
    p.add_argument(
        "--shortcut",
        nargs="+",
        default=None,
        metavar="STEPS:CFG:TEMPERATURE[:LO-HI]",
        help="shortcut rows with their own guidance scale, noise temperature and optional guidance "
        "interval in flow time (replaces --steps)",
    )
    p.add_argument(
        "--sampler", default="euler", choices=["euler", "heun"], help="sampler of the few-step runs"
    )
    p.add_argument("--n_per_category", type=int, default=50)
    p.add_argument("--categories", nargs="+", default=list(EVAL_CATEGORIES), choices=list(EVAL_CATEGORIES))
    p.add_argument("--guidance_scale", type=float, default=1.5)
    p.add_argument("--temperature", type=float, default=1.0, help="scale of each token's initial noise")
    p.add_argument("--repeats", type=int, default=None, help="timing rounds (default 3, quick 1)")
    p.add_argument("--seed", type=int, default=0, help="prompt and noise seed of the judged images")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny random model, 2 prompts (seconds, for CI)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    if args.model is None and not args.quick:
        p.error("give --model DIR (a trained continuous-token folder), or --quick")
    try:
        shortcut = [parse_shortcut(text) for text in args.shortcut] if args.shortcut else None
    except ValueError as e:
        p.error(f"--shortcut: {e}")
    if min(args.steps) < 1 or args.n_per_category < 1:
        p.error("--steps and --n_per_category must be ≥ 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    n = 2 if args.quick else args.n_per_category
    tmp = tempfile.TemporaryDirectory()
    model = args.model or str(tiny_random_model(Path(tmp.name) / "model"))
    gen = MMGenerator.from_pretrained(model)
    if not gen.is_continuous:
        p.error(f"{model} samples discrete codes; this benchmark needs a diffusion-head model")
    h, w = gen.image_tokenizer.token_grid(gen.resolution, gen.resolution)
    base = {"guidance_scale": args.guidance_scale, "temperature": args.temperature}
    shortcut = shortcut or [{"steps": s, **base} for s in args.steps]
    settings = [{**BASELINE, **base}] + [
        {"name": f"shortcut-{r['steps']}", "sampler": args.sampler, **r} for r in shortcut
    ]
    if args.shortcut:  # rows may share a step count: name them by their sampling too
        for r in settings[1:]:
            r["name"] += f"@{r['guidance_scale']:g}/{r['temperature']:g}"
            if "guidance_interval" in r:
                r["name"] += "/{:g}-{:g}".format(*r["guidance_interval"])
    if len({r["name"] for r in settings}) < len(settings):
        p.error("each shortcut row must differ in steps, CFG, temperature or guidance interval")
    times: dict[str, dict[str, list[float]]] = {s["name"]: {"head": [], "total": []} for s in settings}
    scores: dict[str, dict[str, float]] = {}
    images = n * len(args.categories)
    for _ in range(repeats):
        for s in settings:
            with HeadTimer() as timer:
                t0 = time.perf_counter()
                result = evaluate_text_to_image(
                    gen,
                    n_per_category=n,
                    categories=args.categories,
                    seed=args.seed,
                    guidance_scale=s["guidance_scale"],
                    temperature=s["temperature"],
                    num_inference_steps=s["steps"],
                    sampler=s["sampler"],
                    guidance_interval=s.get("guidance_interval"),
                )
                total = time.perf_counter() - t0
            times[s["name"]]["head"].append(timer.seconds / (images * h * w) * 1e3)
            times[s["name"]]["total"].append(total / images)
            scores.setdefault(s["name"], result.scores)
    base_head = statistics.median(times[BASELINE["name"]]["head"])
    base_total = statistics.median(times[BASELINE["name"]]["total"])
    rows = []
    for s in settings:
        head = statistics.median(times[s["name"]]["head"])
        total = statistics.median(times[s["name"]]["total"])
        rows.append(
            {
                **s,
                "head_ms_per_token": round(head, 4),
                "s_per_image": round(total, 4),
                "head_speedup": round(base_head / head, 2),
                "speedup": round(base_total / total, 2),
                "scores": scores[s["name"]],
            }
        )
    results = {
        "bench": "diffusion_head",
        "quick": args.quick,
        "model": args.model or "tiny random (quick)",
        "threads": torch.get_num_threads(),
        "guidance_scale": args.guidance_scale,
        "temperature": args.temperature,
        "n_per_category": n,
        "seed": args.seed,
        "repeats": repeats,
        "tokens_per_image": h * w,
        "rows": rows,
    }
    cats = list(args.categories)
    print(
        f"{'setting':<26}{'CFG':>5}{'temp':>6}{'head ms/tok':>12}{'s/image':>9}{'head ×':>8}{'total ×':>8}  "
        + "  ".join(cats)
    )
    for r in rows:
        judged = "  ".join(f"{r['scores'][c]:>{len(c)}.0%}" for c in cats)
        print(
            f"{r['name']:<26}{r['guidance_scale']:>5g}{r['temperature']:>6g}{r['head_ms_per_token']:>12.3f}"
            f"{r['s_per_image']:>9.3f}{r['head_speedup']:>8.1f}{r['speedup']:>8.1f}  {judged}"
        )
    emit_json(results, args.out)
    tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
