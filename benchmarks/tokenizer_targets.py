"""Stage-1 targets: train each shipped tokenizer config on shapes 32×32, then evaluate on held-out
shapes, digits and real photos. Prints one JSON line per run and a table.

    python benchmarks/tokenizer_targets.py                     # all runs (≈ 30 min on 2 CPU cores)
    python benchmarks/tokenizer_targets.py --only fsq_8x8      # the FSQ target alone (≈ 10 min)
    python benchmarks/tokenizer_targets.py --quick             # seconds: CI smoke mode, numbers meaningless

Each run is a real ``tokenizers_mm.train`` run in this process (one process; the same code runs under
``accelerate launch``). Wall time is the training loop only, as reported by the trainer.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from data.sources import images_tensor
from tokenizers_mm.config_io import load_config
from tokenizers_mm.evaluate import evaluate_tokenizer, judge_reconstructions
from tokenizers_mm.modeling import ImageTokenizer
from tokenizers_mm.train import TrainConfig, main

CONFIGS = Path(__file__).resolve().parent.parent / "tokenizers_mm" / "configs"
# name → (config file, extra overrides). The VQ ablation shares one budget so the four are comparable.
RUNS: dict[str, tuple[str, list[str]]] = {
    "fsq_8x8": ("fsq_8x8.yaml", []),
    "fsq_8x8_joint": ("fsq_8x8_joint.yaml", []),
    "vq_rotation_restart": ("vq_8x8.yaml", ["--model.vq_gradient", "rotation"]),
    "vq_rotation_norestart": (
        "vq_8x8.yaml",
        ["--model.vq_gradient", "rotation", "--model.vq_dead_code_steps", "0"],
    ),
    "vq_ste_restart": ("vq_8x8.yaml", ["--model.vq_gradient", "ste"]),
    "vq_ste_norestart": ("vq_8x8.yaml", ["--model.vq_gradient", "ste", "--model.vq_dead_code_steps", "0"]),
    "kl_8x8": ("kl_8x8.yaml", []),
    "patches_4": ("patches_4.yaml", []),
}
QUICK = [
    "--max_steps",
    "3",
    "--train_num",
    "128",
    "--eval_num",
    "16",
    "--batch_size",
    "16",
    "--warmup_steps",
    "1",
]
QUICK_MODEL = ["--model.base_channels", "8"]  # not for raw patches, which have no model options


def run_one(
    name: str, out_root: Path, quick: bool, eval_num: int, skip_train: bool = False, judge_num: int = 100
) -> dict:
    config, extra = RUNS[name]
    overrides = [*extra, "--output_dir", str(out_root / name), "--log_every", "50"]
    if quick:
        overrides += QUICK + ([] if name == "patches_4" else QUICK_MODEL)
    cfg = load_config(TrainConfig, CONFIGS / config, overrides)
    if skip_train:  # evaluate a finished run of this config (its metrics.json gives the train time)
        metrics = json.loads((out_root / name / "metrics.json").read_text())
    else:
        metrics = main(cfg)
    model = ImageTokenizer.from_pretrained(out_root / name / "final")
    row = {
        "run": name,
        "params": metrics["params"],
        "train_time_s": metrics["train_time_s"],
        "steps": cfg.max_steps,
    }
    for dataset, split in (("shapes", "test"), ("digits", "test"), ("photos", "test")):
        images, _ = images_tensor(
            dataset, num=16 if quick else eval_num, resolution=32, seed=1_000_003, split=split
        )
        m = evaluate_tokenizer(model, images)
        row[f"{dataset}_psnr"] = round(m["psnr"], 2)
        row[f"{dataset}_ssim"] = round(m["ssim"], 4)
        if "codebook_usage" in m:
            row[f"{dataset}_usage"] = round(m["codebook_usage"], 4)
            row[f"{dataset}_perplexity"] = round(m["perplexity"], 1)
    # the judge on reconstructions of the Stage-2 evaluation scenes: the ceiling for a decoder on these tokens
    judged = judge_reconstructions(model, n_per_category=4 if quick else judge_num)
    row.update({f"judge_{k}": round(v, 3) for k, v in judged.items()})
    return row


def main_cli(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=list(RUNS), default=None)
    p.add_argument("--quick", action="store_true", help="tiny settings for CI (numbers meaningless)")
    p.add_argument("--eval_num", type=int, default=512)
    p.add_argument("--judge_num", type=int, default=100, help="judged reconstructions per shapes category")
    p.add_argument("--out", default=None, help="run folder (default: a temp dir)")
    p.add_argument("--skip_train", action="store_true", help="evaluate finished runs in --out/NAME")
    args = p.parse_args(argv)
    names = args.only or list(RUNS)
    out_root = Path(args.out or tempfile.mkdtemp(prefix="tokenizer_targets_"))
    rows = []
    for name in names:
        row = run_one(name, out_root, args.quick, args.eval_num, args.skip_train, args.judge_num)
        print(json.dumps({"bench": "tokenizer_targets", **row}), flush=True)
        rows.append(row)
    cols = [
        "run",
        "steps",
        "train_time_s",
        "shapes_psnr",
        "shapes_usage",
        "digits_psnr",
        "photos_psnr",
        "judge_overall",
    ]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    print(f"\n(torch {torch.__version__}, {torch.get_num_threads()} threads; runs in {out_root})")
    return rows


if __name__ == "__main__":
    main_cli()
