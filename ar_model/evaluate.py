"""Stage-2 evaluation: text-to-image judged automatically, and captioning of held-out images.

    python -m ar_model.evaluate --model DIR --out metrics.json [--grids DIR]

* text-to-image on shapes: `data.shapes.eval_prompts` per category, each image scored by the
  judge against the prompt's reference scene ("color" checks colour only);
* text-to-image on digits: "the digit k" prompts in the training templates, scored by an SVM
  trained on real train-split digits (`data.digits_classifier`);
* image-to-text: held-out test shapes are captioned and the caption judged against the real
  image (a caption outside the grammar counts as wrong); held-out test digits must be captioned
  with their digit word and no other.

Targets (issue 3): single ≥ 0.9, two_objects / position / count ≥ 0.5 each, digits ≥ 0.9.
Any object with the `MMGeneratorLike` interface can be evaluated; the CLI loads an
`ar_model.generator.MMGenerator`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ar_model.generation import CFG_SCHEDULES
from data.digits import DIGIT_WORDS, generate_digits
from data.digits_classifier import DigitsClassifier, digit_prompts, images_to_pil
from data.images import make_grid
from data.shapes import EVAL_CATEGORIES, JudgeResult, eval_prompts, generate_shapes, judge

TARGETS: dict[str, float] = {
    "single": 0.9,
    "two_objects": 0.5,
    "position": 0.5,
    "count": 0.5,
    "digits": 0.9,
}


@runtime_checkable
class MMGeneratorLike(Protocol):
    """What the evaluation uses of a trained model (implemented by `ar_model.generator.MMGenerator`)."""

    @property
    def resolution(self) -> int:
        """Image side in pixels."""
        ...

    def text_to_image(
        self,
        prompts: list[str],
        *,
        guidance_scale: float = 1.5,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """One uint8 (N, 3, H, W) image per prompt."""
        ...

    def image_to_text(
        self, images: torch.Tensor, *, max_new_tokens: int = 32, batch_size: int = 64
    ) -> list[str]:
        """One greedy caption per uint8 (N, 3, H, W) image."""
        ...


@dataclass
class T2IResult:
    """Judge accuracy per category (+ "overall", their mean) and the images, per category."""

    scores: dict[str, float]
    images: dict[str, torch.Tensor]  # category -> uint8 (n, 3, H, W)
    prompts: dict[str, list[str]]
    correct: dict[str, list[bool]] = field(default_factory=dict)
    # category -> share of images failing each judge rule, and the share with each detected-object count
    rules: dict[str, dict[str, float]] = field(default_factory=dict)
    # with plain=True: the scores of plain sampling (candidate 0 of each best-of-C image), as ``scores``
    plain_scores: dict[str, float] = field(default_factory=dict)


JUDGE_RULES: tuple[str, ...] = ("color_ok", "shape_ok", "count_ok", "size_ok", "position_ok")


def rule_breakdown(results: list[JudgeResult]) -> dict[str, float]:
    """Why images fail: the share failing each judge rule (``fails_<rule>``) and the share with
    0, 1, 2 and 3+ detected objects (``objects_<n>``). A failing image may break several rules."""
    n = max(len(results), 1)
    out = {
        f"fails_{rule.removesuffix('_ok')}": sum(not getattr(r, rule) for r in results) / n
        for rule in JUDGE_RULES
    }
    found = Counter(min(len(r.detected), 3) for r in results)  # 3 stands for 3+
    out.update({f"objects_{k}{'+' if k == 3 else ''}": found[k] / n for k in range(4)})
    return out


def failed_rules(breakdown: dict[str, float]) -> dict[str, float]:
    """The ``fails_<rule>`` shares of a :func:`rule_breakdown`, keyed by rule name (``"color"``, ...)."""
    return {k.removeprefix("fails_"): v for k, v in breakdown.items() if k.startswith("fails_")}


@dataclass
class DigitsResult:
    """Classifier accuracy on generated "digit k" images, overall and per digit."""

    accuracy: float
    per_digit: dict[int, float]
    images: torch.Tensor  # uint8 (10 * n_per_digit, 3, H, W), digit-major
    prompts: list[str]
    classifier_test_accuracy: float
    labels: list[int] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list)
    plain_accuracy: float | None = None  # with plain=True: plain sampling's accuracy


@dataclass
class CaptionSample:
    """One captioned held-out image; `source` is "shapes" or "digits"."""

    source: str
    image: Image.Image
    reference: str
    generated: str
    correct: bool


@dataclass
class CaptionResult:
    """Captioning accuracy on held-out shapes (judged) and digits (right digit word)."""

    shapes_accuracy: float
    shapes_parse_rate: float  # fraction of shapes captions the caption grammar accepts
    shapes_per_kind: dict[str, float]
    digits_accuracy: float
    samples: list[CaptionSample]

    @property
    def scores(self) -> dict[str, Any]:
        return {
            "shapes_accuracy": self.shapes_accuracy,
            "shapes_parse_rate": self.shapes_parse_rate,
            "shapes_per_kind": self.shapes_per_kind,
            "digits_accuracy": self.digits_accuracy,
        }


def _check_images(gen: MMGeneratorLike, images: torch.Tensor, n: int) -> torch.Tensor:
    res = gen.resolution
    if images.dtype != torch.uint8 or tuple(images.shape) != (n, 3, res, res):
        found = f"{images.dtype} {tuple(images.shape)}"
        raise ValueError(f"text_to_image must return uint8 ({n}, 3, {res}, {res}), got {found}")
    return images.cpu()


def _generate(
    gen: MMGeneratorLike, prompts: list[str], seed: int, sampling: dict[str, Any], plain: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`gen.text_to_image`, checked: uint8 (len(prompts), 3, R, R) on the CPU; with ``plain``, also the
    images plain sampling gives (``num_candidates`` 1), else None.

    Best-of-C sampling keeps candidate 0 of every image, which is the plain sample, so a generator with
    ``text_to_token_candidates`` (MMGenerator) yields both from one pass; others sample twice.
    """
    c = sampling.get("num_candidates", 1)
    if plain and c > 1 and hasattr(gen, "text_to_token_candidates"):
        from ar_model.rerank import best_of

        tokens, scores = gen.text_to_token_candidates(prompts, seed=seed, **sampling)  # (M, C, ...), (M, C)
        images = gen.decode_tokens(best_of(tokens, scores))
        first = gen.decode_tokens(tokens[:, 0])
        return _check_images(gen, images, len(prompts)), _check_images(gen, first, len(prompts))
    images = _check_images(gen, gen.text_to_image(prompts, seed=seed, **sampling), len(prompts))
    if not plain:
        return images, None
    if c == 1:
        return images, images
    one = {k: v for k, v in sampling.items() if k != "num_candidates"}
    return images, _check_images(gen, gen.text_to_image(prompts, seed=seed, **one), len(prompts))


def _to_uint8(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size -> uint8 (N, 3, H, W)."""
    pixels = np.stack([np.asarray(im.convert("RGB")) for im in images])  # (N, H, W, 3)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def evaluate_text_to_image(
    gen: MMGeneratorLike,
    *,
    n_per_category: int = 50,
    categories: tuple[str, ...] | list[str] = EVAL_CATEGORIES,
    seed: int = 0,
    plain: bool = False,
    **sampling: Any,
) -> T2IResult:
    """Judge `n_per_category` generated images per shapes category (GenEval-style accuracy).

    With ``plain``, ``plain_scores`` also holds the scores of plain sampling (candidate 0 of each image
    when ``num_candidates > 1``: the same images ``num_candidates = 1`` gives)."""
    if n_per_category < 1:
        raise ValueError(f"n_per_category must be >= 1, got {n_per_category}")
    categories = list(dict.fromkeys(categories))
    if not categories or any(c not in EVAL_CATEGORIES for c in categories):
        raise ValueError(f"categories must be a non-empty subset of {EVAL_CATEGORIES}, got {categories}")
    prompts = {c: eval_prompts(c, n_per_category, seed, gen.resolution) for c in categories}
    # one call for all categories, so the generator can fill its batches
    flat = [caption for c in categories for caption, _ in prompts[c]]
    images, plain_images = _generate(gen, flat, seed, sampling, plain)

    result = T2IResult({}, {}, {}, {})
    for i, c in enumerate(categories):
        chunk = images[i * n_per_category : (i + 1) * n_per_category]
        pils = images_to_pil(chunk)
        verdicts = [judge(im, spec) for im, (_, spec) in zip(pils, prompts[c])]
        result.correct[c] = [v.score(c) for v in verdicts]
        result.rules[c] = rule_breakdown(verdicts)
        result.scores[c] = float(np.mean(result.correct[c]))
        result.images[c] = chunk
        result.prompts[c] = [caption for caption, _ in prompts[c]]
        if plain_images is not None:
            first = images_to_pil(plain_images[i * n_per_category : (i + 1) * n_per_category])
            result.plain_scores[c] = float(
                np.mean([judge(im, spec).score(c) for im, (_, spec) in zip(first, prompts[c])])
            )
    result.scores["overall"] = float(np.mean([result.scores[c] for c in categories]))
    if plain_images is not None:
        result.plain_scores["overall"] = float(np.mean([result.plain_scores[c] for c in categories]))
    return result


def evaluate_digits(
    gen: MMGeneratorLike, *, n_per_digit: int = 20, seed: int = 0, plain: bool = False, **sampling: Any
) -> DigitsResult:
    """Generate `n_per_digit` images per digit and score them with a classifier of real digits (with
    ``plain``, also plain sampling's accuracy, as in :func:`evaluate_text_to_image`)."""
    prompts = digit_prompts(n_per_digit, seed)
    images, plain_images = _generate(gen, [caption for caption, _ in prompts], seed, sampling, plain)
    classifier = DigitsClassifier.fit(gen.resolution)
    labels = np.array([label for _, label in prompts])
    predictions = classifier.predict(images)
    hits = predictions == labels
    plain_accuracy = None
    if plain_images is not None:
        plain_accuracy = float((classifier.predict(plain_images) == labels).mean())
    return DigitsResult(
        plain_accuracy=plain_accuracy,
        accuracy=float(hits.mean()),
        per_digit={k: float(hits[labels == k].mean()) for k in range(10)},
        images=images,
        prompts=[caption for caption, _ in prompts],
        classifier_test_accuracy=classifier.test_accuracy,
        labels=labels.tolist(),
        predictions=predictions.tolist(),
    )


def names_digit(caption: str, label: int) -> bool:
    """True if the only digit words in `caption` are `DIGIT_WORDS[label]`."""
    named = {w for w in re.findall(r"[a-z]+", caption.lower()) if w in DIGIT_WORDS}
    return named == {DIGIT_WORDS[label]}


def _caption_is_true(image: Image.Image, caption: str) -> tuple[bool, bool]:
    """(parsed, correct) of a generated caption judged against the real image."""
    try:
        return True, judge(image, caption).correct
    except ValueError:  # parse_caption rejects captions outside the grammar
        return False, False


def evaluate_captions(
    gen: MMGeneratorLike, *, n: int = 100, seed: int = 0, max_new_tokens: int = 32, batch_size: int = 64
) -> CaptionResult:
    """Caption `n` held-out shapes and `n` held-out digits; score them (see the module docstring)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    shapes = list(generate_shapes(n, gen.resolution, seed, split="test"))
    digits = list(generate_digits(n, gen.resolution, seed, split="test"))
    images = _to_uint8([s.image for s in shapes + digits])
    captions = gen.image_to_text(images, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if len(captions) != len(images):
        raise ValueError(f"image_to_text returned {len(captions)} captions for {len(images)} images")

    samples, parsed, by_kind = [], [], {}
    for s, caption in zip(shapes, captions[:n]):
        ok_parse, ok = _caption_is_true(s.image, caption)
        parsed.append(ok_parse)
        by_kind.setdefault(s.meta["kind"], []).append(ok)
        samples.append(CaptionSample("shapes", s.image, s.caption, caption, ok))
    for s, caption in zip(digits, captions[n:]):
        ok = names_digit(caption, s.meta["label"])
        samples.append(CaptionSample("digits", s.image, s.caption, caption, ok))
    return CaptionResult(
        shapes_accuracy=float(np.mean([x.correct for x in samples[:n]])),
        shapes_parse_rate=float(np.mean(parsed)),
        shapes_per_kind={k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
        digits_accuracy=float(np.mean([x.correct for x in samples[n:]])),
        samples=samples,
    )


# ----------------------------------------------------------------------------- grids


def _upscaled_grid(images: list[Image.Image], nrow: int, scale: int) -> Image.Image:
    grid = make_grid(images, nrow=nrow, pad_value=128)  # grey padding: the images have black backgrounds
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)


def _caption_sheet(samples: list[CaptionSample], scale: int) -> Image.Image:
    """One row per sample: the image (×scale) beside its reference and generated caption."""
    font = ImageFont.load_default()
    lines = [
        (f"ref: {s.reference}", f"gen: {s.generated}  [{'ok' if s.correct else 'wrong'}]") for s in samples
    ]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(probe.textlength(line, font=font) for pair in lines for line in pair)
    side = max(s.image.width for s in samples) * scale
    row_h, pad = max(side, 30), 4
    sheet = Image.new(
        "RGB", (side + int(text_w) + 4 * pad, len(samples) * (row_h + pad) + pad), (255, 255, 255)
    )
    draw = ImageDraw.Draw(sheet)
    for i, (s, (ref, gen)) in enumerate(zip(samples, lines)):
        top = pad + i * (row_h + pad)
        tile = s.image.resize((s.image.width * scale, s.image.height * scale), Image.Resampling.NEAREST)
        sheet.paste(tile, (pad, top))
        draw.text((side + 2 * pad, top + 2), ref, fill=(0, 0, 0), font=font)
        draw.text((side + 2 * pad, top + 16), gen, fill=(0, 110, 0) if s.correct else (200, 0, 0), font=font)
    return sheet


def sample_grids(
    result: T2IResult | DigitsResult | CaptionResult,
    out_dir: str | Path,
    *,
    scale: int = 4,
    max_images: int = 64,
) -> dict[str, Path]:
    """Write PNG sample grids of a result into `out_dir`, upscaled ×`scale` (nearest); name -> path.

    T2IResult: `t2i_<category>.png` (prompts in reading order in `t2i_<category>.txt`);
    DigitsResult: `digits.png`, one row per digit; CaptionResult: `captions_<source>.png`.
    """
    if scale < 1 or max_images < 1:
        raise ValueError(f"scale and max_images must be >= 1, got {scale}, {max_images}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if isinstance(result, T2IResult):
        for c, images in result.images.items():
            tiles = images_to_pil(images[:max_images])
            path = out / f"t2i_{c}.png"
            _upscaled_grid(tiles, min(10, len(tiles)), scale).save(path)
            written[f"t2i_{c}"] = path
            marks = result.correct.get(c) or [None] * len(result.prompts[c])
            listing = [
                f"{i:3d}  {'' if ok is None else 'ok   ' if ok else 'wrong'}  {prompt}"
                for i, (prompt, ok) in enumerate(zip(result.prompts[c][:max_images], marks))
            ]
            (out / f"t2i_{c}.txt").write_text("\n".join(listing) + "\n")
    elif isinstance(result, DigitsResult):
        per_row = max(1, min(10, max_images // 10))
        labels = np.array(result.labels)
        rows = [np.flatnonzero(labels == k)[:per_row] for k in range(10)]
        per_row = min(per_row, max(len(r) for r in rows))
        blank = Image.new("RGB", (result.images.shape[-1], result.images.shape[-2]))
        tiles = []
        for r in rows:
            row = images_to_pil(result.images[torch.as_tensor(r, dtype=torch.long)]) if len(r) else []
            tiles += row + [blank] * (per_row - len(row))
        path = out / "digits.png"
        _upscaled_grid(tiles, per_row, scale).save(path)
        written["digits"] = path
    elif isinstance(result, CaptionResult):
        for source in ("shapes", "digits"):
            chosen = [s for s in result.samples if s.source == source][: min(max_images, 16)]
            if chosen:
                path = out / f"captions_{source}.png"
                _caption_sheet(chosen, scale).save(path)
                written[f"captions_{source}"] = path
    else:
        raise TypeError(f"expected a T2IResult, DigitsResult or CaptionResult, got {type(result).__name__}")
    return written


# ----------------------------------------------------------------------------- CLI


def metrics_dict(t2i: T2IResult, digits: DigitsResult, captions: CaptionResult) -> dict[str, Any]:
    """JSON-ready metrics of the three evaluations, with the issue-3 targets and whether each is met."""
    scores = {**t2i.scores, "digits": digits.accuracy}
    return {
        "text_to_image": t2i.scores,
        "text_to_image_failures": t2i.rules,
        "digits": {
            "accuracy": digits.accuracy,
            "per_digit": {DIGIT_WORDS[k]: v for k, v in digits.per_digit.items()},
            "classifier_test_accuracy": digits.classifier_test_accuracy,
        },
        "captions": captions.scores,
        "targets": {
            name: {"target": target, "score": scores[name], "met": scores[name] >= target}
            for name, target in TARGETS.items()
            if name in scores
        },
    }


def format_table(metrics: dict[str, Any]) -> str:
    """A readable table of `metrics_dict` output."""
    targets = metrics["targets"]
    rows = [("metric", "score", "target")]

    def target(name: str) -> str:
        t = targets.get(name)
        return f"{t['target']:.2f} {'ok' if t['met'] else 'MISSED'}" if t else ""

    failures, why_lines = metrics.get("text_to_image_failures", {}), []
    for c, v in metrics["text_to_image"].items():
        rows.append((f"t2i {c}", f"{v:.3f}", target(c)))
        if v < 1 and c in failures:  # why the misses failed, most common rule first
            fails = sorted(((k, r) for k, r in failed_rules(failures[c]).items() if r), key=lambda x: -x[1])
            counts = "/".join(
                f"{failures[c][k]:.0%}" for k in ("objects_0", "objects_1", "objects_2", "objects_3+")
            )
            why = ", ".join(f"{k} {r:.0%}" for k, r in fails)
            why_lines.append(f"t2i {c} fails {why or '-'}; images with 0/1/2/3+ objects {counts}")
    d = metrics["digits"]
    rows.append(("t2i digits", f"{d['accuracy']:.3f}", target("digits")))
    rows.append(("  digit classifier (real test)", f"{d['classifier_test_accuracy']:.3f}", ""))
    cap = metrics["captions"]
    rows.append(("captions shapes", f"{cap['shapes_accuracy']:.3f}", ""))
    for kind, v in cap["shapes_per_kind"].items():
        rows.append((f"  captions shapes {kind}", f"{v:.3f}", ""))
    rows.append(("  captions shapes parsed", f"{cap['shapes_parse_rate']:.3f}", ""))
    rows.append(("captions digits", f"{cap['digits_accuracy']:.3f}", ""))
    width = max(len(r[0]) for r in rows)
    return "\n".join([*(f"{a:<{width}}  {b:>6}  {c}".rstrip() for a, b, c in rows), *why_lines])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tokenizers_mm.checkpoints import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="MMGenerator folder or Hub repo id")
    p.add_argument("--out", required=True, help="metrics.json to write")
    p.add_argument("--n_per_category", type=int, default=50, help="text-to-image prompts per shapes category")
    p.add_argument("--n_digits_per_class", type=int, default=20, help="text-to-image prompts per digit")
    p.add_argument("--n_captions", type=int, default=100, help="held-out images captioned, per dataset")
    p.add_argument(
        "--guidance_scale", type=float, default=1.5, help="1.5 scored best on the shipped CPU model (README)"
    )
    p.add_argument("--cfg_schedule", choices=CFG_SCHEDULES, default="constant")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--num_candidates", type=int, default=1, help="best of K samples by the model's caption score"
    )
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--max_new_tokens", type=int, default=32, help="caption length limit")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grids", default=None, help="folder for PNG sample grids")
    args = p.parse_args(argv)
    for name in (
        "n_per_category", "n_digits_per_class", "n_captions", "max_new_tokens", "batch_size", "num_candidates"
    ):  # fmt: skip
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
        p.error(f"--guidance_scale must be a finite number >= 0, got {args.guidance_scale}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        p.error(f"--temperature must be > 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top_k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if not Path(args.model).is_dir():
        p.error(f"--model {args.model} is not a folder")

    from ar_model.generator import MMGenerator  # imported here: the evaluators need only the protocol

    gen = MMGenerator.from_pretrained(args.model)
    sampling = {
        "guidance_scale": args.guidance_scale,
        "cfg_schedule": args.cfg_schedule,
        "temperature": args.temperature,
        "num_candidates": args.num_candidates,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "batch_size": args.batch_size,
    }
    t2i = evaluate_text_to_image(gen, n_per_category=args.n_per_category, seed=args.seed, **sampling)
    digits = evaluate_digits(gen, n_per_digit=args.n_digits_per_class, seed=args.seed, **sampling)
    captions = evaluate_captions(
        gen, n=args.n_captions, seed=args.seed, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    metrics = {
        "model": str(args.model),
        "resolution": gen.resolution,
        "seed": args.seed,
        "sampling": sampling,
        "n_per_category": args.n_per_category,
        "n_digits_per_class": args.n_digits_per_class,
        "n_captions": args.n_captions,
        **metrics_dict(t2i, digits, captions),
    }
    if args.grids:
        grids = {}
        for result in (t2i, digits, captions):
            grids.update({k: str(v) for k, v in sample_grids(result, args.grids).items()})
        metrics["grids"] = grids
    atomic_write_text(args.out, json.dumps(metrics, indent=2) + "\n")
    print(format_table(metrics))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
