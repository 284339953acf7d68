"""Sampling sweep of a trained Stage-2 folder: judge scores per (CFG scale, temperature) and prompt seed.

    python benchmarks/stage2_sampling_sweep.py --model DIR --settings 1.5:1.0 2.5:0.6 --seeds 0 1

Each setting is scored on the shapes categories (``--n_per_category`` prompts each) and on digits
(``--n_digits`` per digit), once per seed; a seed changes both the prompts and the sampling noise, so a
second seed is a held-out check of a setting picked on the first. Prints one JSON line per run and seed.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="MMGenerator folder (e.g. a stage2_targets run's final/)")
    p.add_argument("--settings", nargs="+", default=["1.5:1.0"], help="CFG:temperature pairs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--n_per_category", type=int, default=100)
    p.add_argument("--n_digits", type=int, default=20)
    args = p.parse_args(argv)
    settings = [tuple(float(v) for v in s.split(":")) for s in args.settings]
    if any(len(s) != 2 or s[0] < 0 or s[1] <= 0 for s in settings):
        p.error("--settings takes CFG:temperature pairs with CFG >= 0 and temperature > 0, e.g. 2.5:0.6")

    from ar_model.evaluate import evaluate_digits, evaluate_text_to_image
    from ar_model.generator import MMGenerator

    gen = MMGenerator.from_pretrained(args.model)
    rows = []
    for seed in args.seeds:
        for cfg, temperature in settings:
            t0 = time.time()
            sampling = {"guidance_scale": cfg, "temperature": temperature}
            t2i = evaluate_text_to_image(gen, n_per_category=args.n_per_category, seed=seed, **sampling)
            digits = evaluate_digits(gen, n_per_digit=args.n_digits, seed=seed, **sampling)
            row = {"bench": "stage2_sampling_sweep", "seed": seed, "cfg": cfg, "temperature": temperature}
            row.update({k: round(v, 3) for k, v in t2i.scores.items()})
            row.update({"digits": round(digits.accuracy, 3), "seconds": round(time.time() - t0, 1)})
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
