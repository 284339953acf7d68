"""The main job: embedded data → image tokenizer → decoder → judged images → report, in one command.

    python -m pipelines.quickstart [--out DIR] [--variant discrete|continuous] [--preset default|demo]
                                   [--decoder_steps N] [--fresh] [--key value ...]

Extra ``--key value`` pairs override the image tokenizer's training config (e.g. ``--max_steps 300``).

Runs the whole embedded default on CPU, each step resumable (a finished step leaves a marker and is
skipped on the next run; ``--fresh`` starts over; each step runs in its own child process, so the memory
one step used is returned before the next starts):

1. build the shapes + digits training data as webdataset shards;
2. train the image tokenizer on them (``--variant discrete``: FSQ codes; ``continuous``: KL latents);
3. evaluate it on held-out shapes, digits and real photos;
4. train the decoder on packed caption→image and image→caption documents (codes or latents extracted
   by the frozen tokenizer; latents are predicted by the diffusion head), as ``accelerate launch``
   with two single-threaded processes on CPU;
5. judge its text-to-image samples per category, classify its digits, score its captions;
6. write ``DIR/report/report.md`` with metrics, grids and loss curves.

``DIR/model`` is the trained folder (decoder + text tokenizer + image tokenizer,
:class:`ar_model.generator.MMGenerator`), which ``pipeline("text-to-image", model=DIR/model)`` loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenizers_mm.checkpoints import atomic_write_text


@dataclass(frozen=True)
class QuickstartPreset:
    """Sizes of one main-job preset."""

    shapes_num: int
    digits_num: int
    tokenizer_steps: int | None  # None: the config's max_steps
    eval_num: int
    tokenizer_config: str = "fsq_8x8_joint.yaml"  # a YAML file in tokenizers_mm/configs (set by the variant)
    decoder_config: str = "shapes_cpu.yaml"  # a YAML file in ar_model/configs (set by the variant)
    decoder_steps: int | None = None  # None: the config's max_steps
    decoder_processes: int = 2  # DDP processes (one thread each)
    decoder_overrides: tuple[str, ...] = ()  # extra --key value for ar_model.train
    tokenizer_overrides: tuple[str, ...] = ()  # extra --key value for tokenizers_mm.train (before the user's)
    n_per_category: int = 100  # text-to-image prompts judged per shapes category
    n_digits: int = 20  # prompts per digit
    n_captions: int = 100  # held-out images captioned per dataset


PRESETS: dict[str, QuickstartPreset] = {
    # The data of the measured Stage-2 config (shapes_cpu.yaml: 50k shapes + 20k digits; 20k + 20k scored
    # lower on every shapes category, 10k digits cost digit accuracy: README, Stage 2).
    "default": QuickstartPreset(shapes_num=50000, digits_num=20000, tokenizer_steps=None, eval_num=512),
    # A first look in <= 5 min: the narrow tokenizer on small batches (400 x 32 reached 23.5 dB, 200 x 64
    # 19.0 dB), and a narrower, shallower decoder on half-size batches (hidden 128, 3 layers: 250 steps at
    # ~10k tokens/s reached validation loss 2.72 in 140 s; the tiny preset's 120 steps had reached 3.37 in
    # 162 s on a slower day: README, Quickstart).
    "demo": QuickstartPreset(
        shapes_num=4000,
        digits_num=1000,
        tokenizer_steps=300,
        tokenizer_overrides=("--model.base_channels", "16", "--batch_size", "32"),
        eval_num=128,
        decoder_steps=200,
        decoder_overrides=(
            *("--model.hidden_size", "128", "--model.num_layers", "3", "--lr", "3e-3"),
            *("--tokens_per_batch", "2048", "--warmup_steps", "20"),
        ),
        n_per_category=20,
        n_digits=5,
        n_captions=20,
    ),
    # CI smoke test: seconds, proves every step and report section is produced.
    "smoke": QuickstartPreset(
        shapes_num=256,
        digits_num=64,
        tokenizer_steps=4,
        eval_num=16,
        decoder_steps=3,
        decoder_processes=1,
        decoder_overrides=(
            "--model.hidden_size",
            "32",
            "--model.num_layers",
            "1",
            "--max_len",
            "256",
            "--tokens_per_batch",
            "512",
            "--val_num",
            "8",
            "--eval_every",
            "0",
            "--sample_every",
            "0",
            "--save_every",
            "0",
            "--warmup_steps",
            "1",
            "--num_sample_prompts",
            "2",
        ),  # fmt: skip
        n_per_category=2,
        n_digits=1,
        n_captions=2,
    ),
}


@dataclass(frozen=True)
class Variant:
    """What ``--variant`` changes: the tokenizer and decoder configs and how images are sampled."""

    tokenizer_config: str
    decoder_config: str
    sampling: dict[str, Any]
    # per preset name, QuickstartPreset fields this variant sets differently (e.g. fewer demo steps)
    preset_changes: dict[str, dict[str, Any]] = field(default_factory=dict)


def resolve_preset(preset: str, variant: str) -> QuickstartPreset:
    """The sizes one ``--preset`` / ``--variant`` pair runs with."""
    v = VARIANTS[variant]
    changes = {"tokenizer_config": v.tokenizer_config, "decoder_config": v.decoder_config}
    return dataclasses.replace(PRESETS[preset], **changes, **v.preset_changes.get(preset, {}))


VARIANTS: dict[str, Variant] = {
    # fsq_8x8_joint.yaml: the Stage-1 target config (34.9 dB, usage 99.9%, 0.41M parameters, 8-12 min here)
    # CFG ramped linearly from 1 to 3.0 over the image, temperature 0.8, best of 4 samples by the model's own
    # caption score: on three runs of this recipe (1,500 decoder steps, caption-drop fix), over prompt seeds
    # 0-5, single 92.5-94.0%, two objects 62.5-68.5%, position 64.8-68.8%, count 59.8-62.0%; plain sampling
    # (1 candidate) scored single 84.0-88.5%, two objects 39.0-41.2% on the same runs (README, Stage 2)
    "discrete": Variant(
        "fsq_8x8_joint.yaml",
        "shapes_cpu.yaml",
        {"guidance_scale": 3.0, "cfg_schedule": "linear", "temperature": 0.8, "num_candidates": 4},
    ),
    # The diffusion head makes each decoder step ~2x dearer than a discrete one (4 noise draws per latent):
    # 200 demo steps took 261 s of a 390 s job (README, Quickstart), so the demo trains 80.
    # CFG 4.0 / noise temperature 1.2: the best single-object setting of a sweep on the shipped CPU model,
    # confirmed on held-out prompt seeds (README, issue 4); 1.5 / 1.0 scored 82%.
    "continuous": Variant(
        "kl_8x8.yaml",
        "shapes_kl_cpu.yaml",
        {"guidance_scale": 4.0, "temperature": 1.2, "num_inference_steps": 4},
        preset_changes={"demo": {"decoder_steps": 80}},
    ),
}
CONFIG_DIR = Path(__file__).resolve().parent.parent / "tokenizers_mm" / "configs"
DECODER_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ar_model" / "configs"


def in_child(step: Callable[..., Any], *args: Any) -> Any:
    """Run one step in a fresh (spawned) interpreter and return its result.

    The tokenizer's training and evaluation and the judge each build models and hold data; in the job's own
    process that memory would stay for the rest of the run, on top of the decoder ranks' (the continuous
    default peaked at PSS 4.16 GiB that way, README). A child gives it all back when the step ends. Errors
    are re-raised here with the child's traceback attached.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(step, *args).result()


def _done(marker: Path) -> bool:
    return marker.is_file()


def _mark(marker: Path, info: dict[str, Any]) -> None:
    atomic_write_text(marker, json.dumps(info, indent=2))


def _build_one(name: str, num: int, out: Path, progress: bool) -> float:
    """Build one embedded dataset as webdataset shards; returns the seconds it took."""
    from data.build import build

    start = time.time()
    if out.exists():
        shutil.rmtree(out)
    build(dataset=name, num=num, resolution=32, format="webdataset", out=out, seed=0, progress=progress)
    return time.time() - start


def step_data(out: Path, preset: QuickstartPreset) -> dict[str, Path]:
    """Build the shapes and the digits shards, each in its own process (drawing and PNG encoding are
    single-threaded Python, so two builds at once use both cores: 44 s → 31 s for the default)."""
    paths = {"shapes": out / "data" / "shapes", "digits": out / "data" / "digits"}
    marker = out / "data" / "DONE"
    if not _done(marker):
        sizes = {"shapes": preset.shapes_num, "digits": preset.digits_num}
        with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
            # one progress bar (the larger build's): two would overwrite each other's line
            jobs = {n: pool.submit(_build_one, n, sizes[n], paths[n], n == "shapes") for n in paths}
            for name, job in jobs.items():
                print(f"{name}: {sizes[name]} images in {job.result():.0f} s", flush=True)
        _mark(marker, {k: str(v) for k, v in paths.items()})
    else:
        print("[1/6] data: done, skipping")
    return paths


def step_tokenizer(
    out: Path, preset: QuickstartPreset, data_paths: dict[str, Path], overrides: list[str]
) -> Path:
    from tokenizers_mm.config_io import load_config
    from tokenizers_mm.train import TrainConfig, main

    run = out / "tokenizer"
    marker = run / "DONE"
    if _done(marker):
        print("[2/6] tokenizer: done, skipping")
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
            *preset.tokenizer_overrides,
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
        print("[3/6] evaluate: done, skipping")
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def step_decoder(
    out: Path, preset: QuickstartPreset, data_paths: dict[str, Path], tokenizer_dir: Path
) -> Path:
    """Train the decoder with ``accelerate launch`` (resumable: ``--resume true`` continues a killed run)."""
    run = out / "decoder"
    marker = run / "DONE"
    if _done(marker):
        print("[4/6] decoder: done, skipping")
        return run / "final"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
    ]
    cmd += ["--dynamo_backend", "no", "--num_processes", str(preset.decoder_processes)]
    if preset.decoder_processes > 1:
        env.setdefault("ACCELERATE_USE_CPU", "0" if torch.cuda.is_available() else "1")
        cmd += ["--multi_gpu", "--main_process_port", str(_free_port())]
    cmd += [
        "-m", "ar_model.train", "--config", str(DECODER_CONFIG_DIR / preset.decoder_config),
        "--tokenizer", str(tokenizer_dir), "--output_dir", str(run), "--resume", "true",
        "--train_data", json.dumps([str(data_paths["shapes"]), str(data_paths["digits"])]),
        "--train_nums", json.dumps([preset.shapes_num, preset.digits_num]),  # all the data step built
        "--val_data", json.dumps(["shapes", "digits"]),
        *(["--max_steps", str(preset.decoder_steps)] if preset.decoder_steps else []),
        *preset.decoder_overrides,
    ]  # fmt: skip
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)
    _mark(marker, {"final": str(run / "final")})
    return run / "final"


def step_evaluate_decoder(
    out: Path, preset: QuickstartPreset, model_dir: Path, sampling: dict[str, Any]
) -> dict[str, Any]:
    from ar_model.evaluate import (
        evaluate_captions,
        evaluate_digits,
        evaluate_text_to_image,
        metrics_dict,
        sample_grids,
    )
    from ar_model.generator import MMGenerator

    marker = out / "eval" / "decoder_metrics.json"
    if _done(marker):
        print("[5/6] judge: done, skipping")
        return json.loads(marker.read_text())
    gen = MMGenerator.from_pretrained(model_dir)
    # with best-of-C sampling, also the scores of plain sampling: candidate 0 of each image, same pass
    reranked = sampling.get("num_candidates", 1) > 1
    t2i = evaluate_text_to_image(gen, n_per_category=preset.n_per_category, plain=reranked, **sampling)
    digits = evaluate_digits(gen, n_per_digit=preset.n_digits, plain=reranked, **sampling)
    captions = evaluate_captions(gen, n=preset.n_captions)
    metrics = metrics_dict(t2i, digits, captions)
    metrics["sampling"] = sampling
    if reranked:
        metrics["plain_sampling"] = {**t2i.plain_scores, "digits": digits.plain_accuracy}
    grids = {}
    for result in (t2i, digits, captions):
        grids.update({k: v.name for k, v in sample_grids(result, out / "eval" / "grids").items()})
    metrics["grids"] = grids
    _mark(marker, metrics)
    return metrics


def _sampling_words(sampling: dict[str, Any]) -> str:
    """``CFG 3.0 (linear schedule), temperature 0.8, 4 head steps``: how the judged images were sampled."""
    words = f"CFG {sampling['guidance_scale']}"
    if sampling.get("cfg_schedule", "constant") != "constant":
        words += f" ({sampling['cfg_schedule']} schedule)"
    words += f", temperature {sampling['temperature']}"
    if "num_inference_steps" in sampling:
        words += f", {sampling['num_inference_steps']} head steps"
    if sampling.get("num_candidates", 1) > 1:
        words += f", best of {sampling['num_candidates']} samples by the model's own caption score"
    return words


def _failure_table(failures: dict[str, dict[str, float]]) -> list[str]:
    """Markdown lines: per category, the share of images breaking each judge rule and how many
    objects were detected (`ar_model.evaluate.rule_breakdown`)."""
    from pipelines.report import markdown_table

    if not failures:
        return []
    columns = ["category", *next(iter(failures.values()))]
    rows = [{"category": c, **v} for c, v in failures.items()]
    return [
        "Why images fail: the share of images breaking each judge rule (one image may break several), "
        "and the share with 0, 1, 2 or 3+ detected objects.",
        "",
        markdown_table(rows, columns),
        "",
    ]


def _decoder_section(out: Path, rep: Path, metrics: dict[str, Any]) -> list[str]:
    from pipelines.report import markdown_table, plot_curves, read_log

    grids = out / "eval" / "grids"
    for png in grids.glob("*.png"):
        shutil.copy(png, rep / png.name)
    log = read_log(out / "decoder" / "log.jsonl")
    val = read_log(out / "decoder" / "val_log.jsonl")
    if log:
        plot_curves(log, ["loss"], rep / "decoder_loss.png", "decoder training")
    if val:
        plot_curves(
            val, ["val_loss", "val_image_loss", "val_caption_loss"], rep / "decoder_val.png", "validation"
        )
    train = json.loads((out / "decoder" / "metrics.json").read_text())
    t2i = metrics["text_to_image"]
    targets = metrics["targets"]
    plain = metrics.get("plain_sampling")  # scores without reranking, when the judged images were reranked
    rows = [
        {
            "metric": k,
            "score": v,
            **({"plain sampling": plain.get(k, "")} if plain else {}),
            "target": targets.get(k, {}).get("target", ""),
            "met": targets.get(k, {}).get("met", ""),
        }
        for k, v in {**t2i, "digits": metrics["digits"]["accuracy"]}.items()
    ]
    columns = ["metric", "score", *(["plain sampling"] if plain else []), "target", "met"]
    cap = metrics["captions"]
    md = [
        "## Stage 2: decoder",
        "",
        f"{train['params'] / 1e6:.2f}M parameters, `{train['rope_scheme']}`, {train['steps']} steps in "
        f"{train['train_time_s']:.0f} s ({train['tokens_per_s']:.0f} tokens/s, {train['num_processes']} "
        f"processes); validation loss {train.get('val_loss', float('nan')):.3f} (image codes "
        f"{train.get('val_image_loss', float('nan')):.3f}, "
        f"captions {train.get('val_caption_loss', float('nan')):.3f}).",
        "",
        f"### Text-to-image, judged ({_sampling_words(metrics['sampling'])})",
        "",
        markdown_table(rows, columns),
        "",
        *_failure_table(metrics.get("text_to_image_failures", {})),
        *[
            f"**{name.removeprefix('t2i_')}**\n\n![{name}]({file})\n"
            for name, file in sorted(metrics["grids"].items())
            if name.startswith("t2i_")
        ],
        "**digits** (one row per digit)\n\n![digits](digits.png)\n",
        "### Captioning held-out images",
        "",
        f"Shapes: {cap['shapes_accuracy']:.0%} of captions true of the image (judge), "
        f"{cap['shapes_parse_rate']:.0%} parsed; digits: {cap['digits_accuracy']:.0%} name the right digit.",
        "",
        "![captions shapes](captions_shapes.png)\n\n![captions digits](captions_digits.png)\n",
        "### Decoder training curves",
        "",
        "![decoder loss](decoder_loss.png)" if log else "(no log rows)",
        "",
        "![validation](decoder_val.png)" if val else "",
        "",
    ]
    return md


def step_report(
    out: Path,
    args: argparse.Namespace,
    metrics: dict[str, dict[str, Any]],
    argv: list[str],
    decoder_metrics: dict[str, Any],
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
        *_decoder_section(out, rep, decoder_metrics),
        "## Config",
        "",
        "Tokenizer:",
        "",
        "```json",
        json.dumps(train_cfg, indent=2),
        "```",
        "",
        "Decoder:",
        "",
        "```json",
        (out / "decoder" / "train_config.json").read_text(),
        "```",
        "",
    ]
    atomic_write_text(rep / "report.md", "\n".join(md))
    return rep / "report.md"


def judge_and_record(
    out: Path, preset: QuickstartPreset, model_dir: Path, sampling: dict[str, Any], tokenizer: dict[str, Any]
) -> dict[str, Any]:
    """Step 5 and the model card's metrics, in one child process (one interpreter start fewer)."""
    decoder_metrics = step_evaluate_decoder(out, preset, model_dir, sampling)
    record_metrics_in_card(model_dir, tokenizer, decoder_metrics)
    return decoder_metrics


def record_metrics_in_card(model_dir: Path, tokenizer: dict[str, Any], decoder: dict[str, Any]) -> None:
    """Put the judged scores and tokenizer metrics into the model folder's card (README.md)."""
    from ar_model.generator import MMGenerator

    gen = MMGenerator.from_pretrained(model_dir)
    wanted = {
        "judge": {
            "text_to_image": decoder["text_to_image"],
            "digits_accuracy": decoder["digits"]["accuracy"],
            "captions": decoder["captions"],
            "sampling": decoder.get("sampling", {}),
            **({"plain_sampling": decoder["plain_sampling"]} if "plain_sampling" in decoder else {}),
        },
        "tokenizer": {name: {k: m[k] for k in ("psnr", "ssim") if k in m} for name, m in tokenizer.items()},
    }
    if gen.card.get("metrics") != wanted:
        gen.card["metrics"] = wanted
        gen.save_pretrained(model_dir)


def check_variant(out: Path, variant: str) -> None:
    """One output folder holds one variant: finished steps of the other must not be reused."""
    marker = out / "variant.json"
    if marker.is_file():
        found = json.loads(marker.read_text())["variant"]
        if found != variant:
            raise SystemExit(
                f"{out} holds a --variant {found} run; use another --out, or --fresh to start over"
            )
    else:
        _mark(marker, {"variant": variant})


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="quickstart_out", help="output folder (default: ./quickstart_out)")
    p.add_argument(
        "--preset", default="default", choices=list(PRESETS), help="default (~quality) or demo (fast)"
    )
    p.add_argument(
        "--variant",
        default="discrete",
        choices=list(VARIANTS),
        help="image tokens: discrete FSQ codes (LM head) or continuous KL latents (diffusion head)",
    )
    p.add_argument("--fresh", action="store_true", help="delete DIR and start over")
    p.add_argument(
        "--decoder_steps", type=int, default=None, help="decoder training steps (default: the preset's)"
    )
    args, tokenizer_overrides = p.parse_known_args(argv)
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    variant = VARIANTS[args.variant]
    check_variant(out, args.variant)
    preset = resolve_preset(args.preset, args.variant)
    if args.decoder_steps is not None:
        if args.decoder_steps < 1:
            raise SystemExit(f"--decoder_steps must be >= 1, got {args.decoder_steps}")
        preset = dataclasses.replace(preset, decoder_steps=args.decoder_steps)
    t0 = time.time()
    print(f"[1/6] data → {out / 'data'}")
    data_paths = in_child(step_data, out, preset)
    print(f"[2/6] tokenizer → {out / 'tokenizer'}")
    tok = in_child(step_tokenizer, out, preset, data_paths, tokenizer_overrides)
    print("[3/6] evaluate tokenizer")
    metrics = in_child(step_evaluate, out, preset, tok)
    print(f"[4/6] decoder → {out / 'decoder'}")
    decoder = step_decoder(out, preset, data_paths, tok)
    model = out / "model"
    if not (model / "config.json").is_file():
        from tokenizers_mm.checkpoints import atomic_save_dir

        atomic_save_dir(model, lambda d: shutil.copytree(decoder, d, dirs_exist_ok=True))
    print("[5/6] judge text-to-image, digits and captions")
    decoder_metrics = in_child(judge_and_record, out, preset, model, variant.sampling, metrics)
    print("[6/6] report")
    report = step_report(out, args, metrics, argv, decoder_metrics)
    print(f"done in {time.time() - t0:.0f} s")
    print(f"model:  {model}")
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    main()
