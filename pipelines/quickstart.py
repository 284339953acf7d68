"""The main job: ``python -m pipelines.quickstart [--out DIR] [--preset default|demo] [--fresh]``.

Runs the whole embedded default on CPU, each step resumable (a finished step leaves a marker and is
skipped on the next run; ``--fresh`` starts over):

1. build the shapes + digits training data as webdataset shards;
2. train the FSQ tokenizer on them;
3. evaluate it on held-out shapes, digits and real photos;
4. write ``DIR/report/report.md`` with metrics, reconstruction grids and loss curves.

Stage 2 and 3 (decoder, pipelines) extend this same command as they land.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenizers_mm.checkpoints import atomic_write_text


@dataclass(frozen=True)
class QuickstartPreset:
    """Sizes of one main-job preset."""

    shapes_num: int
    digits_num: int
    tokenizer_config: str  # a YAML file in tokenizers_mm/configs
    tokenizer_steps: int | None  # None: the config's max_steps
    eval_num: int


PRESETS: dict[str, QuickstartPreset] = {
    "default": QuickstartPreset(
        shapes_num=20000, digits_num=4000, tokenizer_config="fsq_8x8.yaml", tokenizer_steps=None, eval_num=512
    ),
    "demo": QuickstartPreset(
        shapes_num=4000, digits_num=1000, tokenizer_config="fsq_8x8.yaml", tokenizer_steps=200, eval_num=128
    ),
    # CI smoke test: seconds, proves every step and report section is produced.
    "smoke": QuickstartPreset(
        shapes_num=256, digits_num=64, tokenizer_config="fsq_8x8.yaml", tokenizer_steps=4, eval_num=16
    ),
}
CONFIG_DIR = Path(__file__).resolve().parent.parent / "tokenizers_mm" / "configs"


def _done(marker: Path) -> bool:
    return marker.is_file()


def _mark(marker: Path, info: dict[str, Any]) -> None:
    atomic_write_text(marker, json.dumps(info, indent=2))


def step_data(out: Path, preset: QuickstartPreset) -> dict[str, Path]:
    from data.build import build

    paths = {"shapes": out / "data" / "shapes", "digits": out / "data" / "digits"}
    marker = out / "data" / "DONE"
    if not _done(marker):
        for name, num in (("shapes", preset.shapes_num), ("digits", preset.digits_num)):
            if paths[name].exists():
                shutil.rmtree(paths[name])
            build(dataset=name, num=num, resolution=32, format="webdataset", out=paths[name], seed=0)
        _mark(marker, {k: str(v) for k, v in paths.items()})
    else:
        print("[1/4] data: done, skipping")
    return paths


def step_tokenizer(
    out: Path, preset: QuickstartPreset, data_paths: dict[str, Path], overrides: list[str]
) -> Path:
    from tokenizers_mm.config_io import load_config
    from tokenizers_mm.train import TrainConfig, main

    run = out / "tokenizer"
    marker = run / "DONE"
    if _done(marker):
        print("[2/4] tokenizer: done, skipping")
        return run / "final"
    cfg = load_config(
        TrainConfig,
        CONFIG_DIR / preset.tokenizer_config,
        [
            "--train_data", json.dumps([str(data_paths["shapes"]), str(data_paths["digits"])]),
            "--eval_num", str(preset.eval_num),
            "--output_dir", str(run),
            "--resume", "true",
            *(["--max_steps", str(preset.tokenizer_steps)] if preset.tokenizer_steps else []),
            *overrides,
        ],
    )  # fmt: skip
    cfg.warmup_steps = min(cfg.warmup_steps, max(cfg.max_steps // 10, 1))
    cfg.save_every = max(cfg.max_steps // 4, 1)
    main(cfg)
    _mark(marker, {"final": str(run / "final")})
    return run / "final"


def step_evaluate(out: Path, preset: QuickstartPreset, tokenizer_dir: Path) -> dict[str, dict[str, Any]]:
    from data.sources import images_tensor
    from tokenizers_mm.evaluate import evaluate_tokenizer, reconstruction_grid
    from tokenizers_mm.modeling import ImageTokenizer

    marker = out / "eval" / "tokenizer_metrics.json"
    if _done(marker):
        print("[3/4] evaluate: done, skipping")
        return json.loads(marker.read_text())
    model = ImageTokenizer.from_pretrained(tokenizer_dir)
    marker.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, split in (("shapes", "test"), ("digits", "test"), ("photos", "test")):
        images, _ = images_tensor(name, num=preset.eval_num, resolution=32, seed=1_000_003, split=split)
        results[name] = evaluate_tokenizer(model, images)
        reconstruction_grid(model, images[:16]).save(out / "eval" / f"recon_{name}.png")
    _mark(marker, results)
    return results


def step_report(
    out: Path, args: argparse.Namespace, metrics: dict[str, dict[str, Any]], argv: list[str]
) -> Path:
    from pipelines.report import markdown_table, plot_curves, read_log

    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    for png in (out / "eval").glob("recon_*.png"):
        shutil.copy(png, rep / png.name)
    log = read_log(out / "tokenizer" / "log.jsonl")
    if log:
        plot_curves(log, ["rec_loss", "psnr", "usage"], rep / "tokenizer_loss.png", "tokenizer training")
    train_cfg = json.loads((out / "tokenizer" / "train_config.json").read_text())
    rows = [{"dataset": k, **v} for k, v in metrics.items()]
    cmd = "python -m pipelines.quickstart " + " ".join(shlex.quote(a) for a in argv)
    md = [
        "# Quickstart report",
        "",
        f"Command: `{cmd}`  ",
        f"Preset: `{args.preset}`; torch {torch.__version__}; {torch.get_num_threads()} threads.",
        "",
        "## Stage 1: image tokenizer",
        "",
        "Held-out evaluation (shapes: unseen seed; digits: test split; photos: never trained on).",
        "",
        markdown_table(
            rows, ["dataset", "psnr", "ssim", "codebook_usage", "perplexity", "token_grid", "num_images"]
        ),
        "",
        "### Reconstructions (top: original, bottom: reconstruction)",
        "",
        *[f"**{k}**\n\n![{k}](recon_{k}.png)\n" for k in metrics],
        "### Training curves",
        "",
        "![tokenizer loss](tokenizer_loss.png)" if log else "(no log rows)",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(train_cfg, indent=2),
        "```",
        "",
    ]
    atomic_write_text(rep / "report.md", "\n".join(md))
    return rep / "report.md"


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="quickstart_out", help="output folder (default: ./quickstart_out)")
    p.add_argument(
        "--preset", default="default", choices=list(PRESETS), help="default (~quality) or demo (fast)"
    )
    p.add_argument(
        "--variant", default="discrete", choices=["discrete"], help="token kind (continuous: issue 4)"
    )
    p.add_argument("--fresh", action="store_true", help="delete DIR and start over")
    args, tokenizer_overrides = p.parse_known_args(argv)
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    preset = PRESETS[args.preset]
    t0 = time.time()
    print(f"[1/4] data → {out / 'data'}")
    data_paths = step_data(out, preset)
    print(f"[2/4] tokenizer → {out / 'tokenizer'}")
    tok = step_tokenizer(out, preset, data_paths, tokenizer_overrides)
    print("[3/4] evaluate")
    metrics = step_evaluate(out, preset, tok)
    print("[4/4] report")
    report = step_report(out, args, metrics, argv)
    print(f"done in {time.time() - t0:.0f} s")
    print(f"tokenizer: {tok}")
    print(f"report:    {report}")
    return report


if __name__ == "__main__":
    main()
