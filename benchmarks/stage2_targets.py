"""Stage-2 quality targets: train the decoder with a shipped config, then judge its generations.

    python benchmarks/stage2_targets.py --tokenizer runs/fsq_8x8/final              # the target run
    python benchmarks/stage2_targets.py --tokenizer DIR --ablation --max_steps 600  # rope_tv/mrope/flat
    python benchmarks/stage2_targets.py --tokenizer DIR --quick                     # CI smoke mode

Each run is a real ``accelerate launch -m ar_model.train`` run (``--num_processes`` processes on
CPU, one thread each: on 2 cores two single-threaded DDP processes train faster than one process
with two threads). Wall time is the trainer's own training-loop time. The trained folder is then
evaluated with :mod:`ar_model.evaluate` (judge per shapes category, digit classifier, captioning),
at each of the sampling settings in ``--guidance_scale`` × ``--temperature`` × ``--top_k`` (discrete codes) ×
``--num_inference_steps`` (diffusion head).
Prints one JSON line per run and setting, and a table; ``--out`` writes all of them as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "ar_model" / "configs" / "shapes_cpu.yaml"
SCHEMES = ("rope_tv", "mrope", "flat")
QUICK = [
    "--max_steps", "4", "--train_num", "64", "--val_num", "8", "--warmup_steps", "1", "--eval_every", "0",
    "--sample_every", "0", "--save_every", "0", "--max_len", "256", "--tokens_per_batch", "512",
    "--num_sample_prompts", "2", "--model.hidden_size", "32", "--model.num_layers", "1",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(out: Path, tokenizer: str, overrides: list[str], num_processes: int, config: Path) -> dict:
    """One ``accelerate launch`` training run; returns its metrics.json."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    if num_processes > 1:
        env["ACCELERATE_USE_CPU"] = env.get("ACCELERATE_USE_CPU", "1")
        launch += ["--multi_gpu", "--main_process_port", str(_free_port())]
    cmd = [*launch, "-m", "ar_model.train", "--config", str(config), "--tokenizer", tokenizer]
    cmd += [*overrides, "--output_dir", str(out)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)
    return json.loads((out / "metrics.json").read_text())


def evaluate(folder: Path, settings: dict, n_per_category: int, n_digits: int, n_captions: int) -> dict:
    import torch

    from ar_model.evaluate import evaluate_captions, evaluate_digits, evaluate_text_to_image, metrics_dict
    from ar_model.generator import MMGenerator

    # OMP_NUM_THREADS wins (other jobs on the machine: one thread avoids OpenMP spin-wait stalls)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, os.cpu_count() or 1)))
    gen = MMGenerator.from_pretrained(folder)
    if torch.cuda.is_available():  # evaluate where the run trained (GPU machines)
        gen.to("cuda")
    # top_k applies to discrete codes, num_inference_steps to the diffusion head: drop the other one
    settings = {
        k: v for k, v in settings.items() if k != ("top_k" if gen.is_continuous else "num_inference_steps")
    }
    t2i = evaluate_text_to_image(gen, n_per_category=n_per_category, **settings)
    digits = evaluate_digits(gen, n_per_digit=n_digits, **settings)
    captions = evaluate_captions(gen, n=n_captions)
    return metrics_dict(t2i, digits, captions)


def _row(name: str, train_metrics: dict, settings: dict, scores: dict) -> dict:
    t2i = scores.get("text_to_image", scores)
    return {
        "run": name,
        "train_time_s": train_metrics.get("train_time_s"),
        "steps": train_metrics.get("steps"),
        "tokens_per_s": train_metrics.get("tokens_per_s"),
        "val_loss": train_metrics.get("val_loss"),
        "val_image_loss": train_metrics.get("val_image_loss"),
        **settings,
        "scores": scores,
        "single": t2i.get("single"),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="trained Stage-1 tokenizer folder")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--out_dir", default=None, help="run folders (default: a temp folder)")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--ablation", action="store_true", help="train once per RoPE scheme, equal steps")
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--guidance_scale", type=float, nargs="+", default=[1.5])
    p.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    p.add_argument("--top_k", type=int, nargs="+", default=[0], help="discrete models only")
    p.add_argument(
        "--num_inference_steps", type=int, nargs="+", default=[4], help="diffusion-head models only"
    )
    p.add_argument("--n_per_category", type=int, default=100)
    p.add_argument("--n_digits", type=int, default=20, help="prompts per digit")
    p.add_argument("--n_captions", type=int, default=100)
    p.add_argument("--skip_train", action="store_true", help="evaluate existing run folders in --out_dir")
    p.add_argument("--quick", action="store_true", help="seconds: CI smoke mode, numbers meaningless")
    p.add_argument("extra", nargs="*", help="more --key value overrides for ar_model.train (after --)")
    args = p.parse_args(argv)
    if args.num_processes < 1 or min(args.n_per_category, args.n_digits, args.n_captions) < 1:
        p.error("--num_processes and the evaluation sizes must be ≥ 1")
    if not Path(args.tokenizer).is_dir():
        p.error(f"--tokenizer {args.tokenizer} is not a folder")
    if args.quick:
        args.n_per_category, args.n_digits, args.n_captions = 2, 1, 2
    root = Path(args.out_dir or tempfile.mkdtemp(prefix="stage2_"))
    schemes = SCHEMES if args.ablation else (None,)
    results = []
    for scheme in schemes:
        name = scheme or "target"
        overrides = list(args.extra) + (QUICK if args.quick else [])
        if scheme:
            overrides += ["--model.rope_scheme", scheme]
        if args.max_steps:
            overrides += ["--max_steps", str(args.max_steps)]
        folder = root / name
        if args.skip_train:
            train_metrics = json.loads((folder / "metrics.json").read_text())
        else:
            train_metrics = train(folder, args.tokenizer, overrides, args.num_processes, Path(args.config))
        grid = itertools.product(args.guidance_scale, args.temperature, args.top_k, args.num_inference_steps)
        for gs, temp, top_k, steps in grid:
            settings = {"guidance_scale": gs, "temperature": temp, "top_k": top_k or None}
            settings["num_inference_steps"] = steps
            scores = evaluate(folder / "final", settings, args.n_per_category, args.n_digits, args.n_captions)
            row = _row(name, train_metrics, settings, scores)
            print(json.dumps(row), flush=True)
            results.append(row)
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(rows: list[dict]) -> str:
    head = "| run | steps | train s | val loss | cfg | temp | top-k | single | color | two obj | position "
    head += "| count | digits | captions (shapes/digits) |"
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        s = r["scores"]
        t = s.get("text_to_image", {})
        c = s.get("captions", {})

        def f(x):
            return "" if x is None else f"{x:.0%}" if isinstance(x, float) and x <= 1 else str(x)

        lines.append(
            f"| {r['run']} | {r['steps']} | {r['train_time_s']} | {r['val_loss']:.3f} | "
            f"{r['guidance_scale']} | "
            f"{r['temperature']} | {r['top_k'] or '-'} | {f(t.get('single'))} | {f(t.get('color'))} | "
            f"{f(t.get('two_objects'))} | {f(t.get('position'))} | {f(t.get('count'))} | "
            f"{f(s.get('digits', {}).get('accuracy'))} | "
            f"{f(c.get('shapes_accuracy'))}/{f(c.get('digits_accuracy'))} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
