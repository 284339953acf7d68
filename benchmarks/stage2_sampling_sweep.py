"""Sampling sweep of a trained Stage-2 folder: judge scores per sampling setting and prompt seed.

    python benchmarks/stage2_sampling_sweep.py --model DIR --settings 1.5:1.0 2.0:0.8:50:0.9:linear --seeds 0

A setting is ``CFG:temperature[:top_k[:top_p[:cfg_schedule]]]``: top_k 0 and top_p 1 switch those
filters off (the defaults), and ``cfg_schedule`` is ``constant`` (default) or ``linear`` (guidance
ramped from 1 to CFG over the image's tokens, ``ar_model.generation.guidance_scale_at``).

Each setting is scored on the shapes categories (``--n_per_category`` prompts each) and on digits
(``--n_digits`` per digit), once per seed; a seed changes both the prompts and the sampling noise, so a
second seed is a held-out check of a setting picked on the first. ``--num_candidates 1 4`` also scores
each setting with self-reranking (best of 4 samples by the model's own caption score, ``ar_model.rerank``);
candidate 0 is the plain sample, so the rows of 1 and 4 share their first draws. Prints one JSON line per
run, seed and candidate count.

For a diffusion-head (continuous) model, temperature scales the initial noise, top-k/top-p do not apply,
and ``--num_inference_steps`` / ``--sampler`` choose the head's sampler (shortcut steps, Euler or Heun).
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from typing import Any

from ar_model.generation import CFG_SCHEDULES


def parse_setting(text: str) -> dict[str, Any]:
    """``"2.0:0.8:50:0.9:linear"`` → sampling keywords of ``ar_model.evaluate`` (filters off at 0 / 1)."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 5:
        raise ValueError(f"{text!r} is not CFG:temperature[:top_k[:top_p[:cfg_schedule]]]")
    cfg, temperature = float(parts[0]), float(parts[1])
    top_k = int(parts[2]) if len(parts) > 2 else 0
    top_p = float(parts[3]) if len(parts) > 3 else 1.0
    schedule = parts[4] if len(parts) > 4 else "constant"
    if cfg < 0 or temperature <= 0 or top_k < 0 or not 0 < top_p <= 1 or schedule not in CFG_SCHEDULES:
        raise ValueError(
            f"{text!r}: need CFG >= 0, temperature > 0, top_k >= 0, 0 < top_p <= 1 and a schedule in "
            f"{CFG_SCHEDULES}"
        )
    return {
        "guidance_scale": cfg,
        "temperature": temperature,
        "top_k": top_k or None,
        "top_p": top_p if top_p < 1 else None,
        "cfg_schedule": schedule,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="MMGenerator folder (e.g. a stage2_targets run's final/)")
    p.add_argument(
        "--settings", nargs="+", default=["1.5:1.0"], help="CFG:temperature[:top_k[:top_p[:cfg_schedule]]]"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--num_candidates", type=int, nargs="+", default=[1], help="best of K by caption score (1: plain)"
    )
    p.add_argument("--n_per_category", type=int, default=100)
    p.add_argument("--n_digits", type=int, default=20)
    p.add_argument("--num_inference_steps", type=int, default=None, help="diffusion head steps (default 4)")
    p.add_argument("--sampler", choices=["euler", "heun"], default=None, help="diffusion head sampler")
    args = p.parse_args(argv)
    try:
        settings = [parse_setting(s) for s in args.settings]
    except ValueError as e:
        p.error(f"--settings: {e}")
    if min(args.num_candidates) < 1:
        p.error(f"--num_candidates must be >= 1, got {args.num_candidates}")

    from ar_model.evaluate import evaluate_digits, evaluate_text_to_image, failed_rules
    from ar_model.generator import MMGenerator

    gen = MMGenerator.from_pretrained(args.model)
    head = {"num_inference_steps": args.num_inference_steps, "sampler": args.sampler}
    head = {k: v for k, v in head.items() if v is not None}
    if head and not gen.is_continuous:
        p.error("--num_inference_steps / --sampler apply to a diffusion-head model; this one samples codes")
    if gen.is_continuous:  # record the head's sampler in every row: the generator's defaults unless given
        defaults = inspect.signature(MMGenerator.text_to_token_candidates).parameters
        head = {k: defaults[k].default for k in ("num_inference_steps", "sampler")} | head
    rows = []
    for seed in args.seeds:
        for sampling, candidates in ((s, k) for s in settings for k in args.num_candidates):
            sampling = {**sampling, **head, "num_candidates": candidates}
            t0 = time.time()
            t2i = evaluate_text_to_image(gen, n_per_category=args.n_per_category, seed=seed, **sampling)
            digits = evaluate_digits(gen, n_per_digit=args.n_digits, seed=seed, **sampling)
            row = {"bench": "stage2_sampling_sweep", "model": args.model, "seed": seed}
            row["cfg"] = sampling["guidance_scale"]
            row.update({k: v for k, v in sampling.items() if k != "guidance_scale"})
            row.update({k: round(v, 3) for k, v in t2i.scores.items()})
            row.update({"digits": round(digits.accuracy, 3), "seconds": round(time.time() - t0, 1)})
            # why single-object images fail (the category furthest from its target): judge rule shares
            fails = failed_rules(t2i.rules.get("single", {}))
            row["single_fails"] = {k: round(v, 3) for k, v in fails.items()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
