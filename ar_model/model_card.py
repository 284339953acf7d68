"""The model card (``README.md``) of an :class:`~ar_model.generator.MMGenerator` folder or Hub repo.

The YAML header carries what the Hub indexes (``pipeline_tag: text-to-image``, ``library_name``,
tags); the body records the architecture, the training data and steps, the evaluation metrics
and a sample grid, from the ``card`` dict the trainer and the evaluation fill in::

    {"training": {"data": ..., "steps": ..., ...},   # anything JSON; rendered as a table
     "metrics": {"text_to_image": {...}, ...},       # nested dicts flatten to dotted keys
     "sample_grid": "path/to/grid.png"}              # copied into the folder as samples.png
"""

from __future__ import annotations

import json
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

LIBRARY_NAME = "mmgen-toolkit"
SAMPLE_GRID_FILE = "samples.png"
TAGS = ["text-to-image", "image-to-text", "autoregressive", "multimodal", "mmgen-toolkit"]


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return json.dumps(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(d: dict[str, Any]) -> list[str]:
    rows = _flatten(d)
    if not rows:
        return ["(not recorded)"]
    return ["| key | value |", "|---|---|", *[f"| {k} | {_cell(v)} |" for k, v in rows]]


def render_model_card(model: Any, card: dict[str, Any], has_grid: bool) -> str:
    """``README.md`` text for ``model`` (an MMGenerator) with the recorded ``card`` data."""
    cfg = model.config
    tok = model.image_tokenizer.config
    h, w = model.image_tokenizer.token_grid(model.resolution, model.resolution)
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag="text-to-image",
        tags=TAGS,
        license="apache-2.0",
    )
    architecture = {
        "decoder": f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
        f"RoPE {cfg.rope_scheme}",
        "vocabulary": f"{cfg.text_vocab_size} text ids + {cfg.num_image_codes} image codes",
        "image tokenizer": f"{tok.bottleneck} at {model.resolution}×{model.resolution} px → {h}×{w} tokens",
    }
    if cfg.code_group > 1:
        g = cfg.code_group
        architecture["image positions"] = (
            f"{h // g}×{w // g}, each holding a {g}×{g} block of codes (code-group head)"
        )
    lines = [
        "# MMGenerator: autoregressive text-to-image and image-to-text",
        "",
        "One decoder-only Transformer over interleaved text and image tokens, with its Stage-1 image "
        "tokenizer and SentencePiece text tokenizer in this one folder. Weights are safetensors; "
        "loading runs no code from the repo (no `trust_remote_code`).",
        "",
        "```python",
        "import pipelines  # registers the tasks and model classes with transformers",
        "from transformers import pipeline",
        "",
        't2i = pipeline("text-to-image", model="THIS_FOLDER_OR_REPO")',
        "images = t2i(\"a red circle\", num_images_per_prompt=4, generator=0)  # [{'image': PIL.Image}, ...]",
        "```",
        "",
        "## Architecture",
        "",
        *_table(architecture),
        "",
        "## Training",
        "",
        *_table(card.get("training", {})),
        "",
        "## Evaluation",
        "",
        *_table(card.get("metrics", {})),
        "",
    ]
    if has_grid:
        lines += ["## Samples", "", f"![samples]({SAMPLE_GRID_FILE})", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))
