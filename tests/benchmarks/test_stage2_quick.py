"""benchmarks/stage2_targets.py in --quick mode: a real 1-process accelerate launch run + evaluation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tokenizers_mm import ImageTokenizer
from tokenizers_mm.presets import preset_config

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_stage2_targets_quick(tmp_path):
    torch.manual_seed(0)
    tok = tmp_path / "tok"
    cfg = preset_config(
        "fsq-8x8", resolution=32, base_channels=8, channel_mult=[1, 2, 2], mid_blocks=0, norm_groups=4
    )
    ImageTokenizer(cfg).save_pretrained(tok)
    out = tmp_path / "results.json"
    rows = _load("stage2_targets").main(
        ["--tokenizer", str(tok), "--quick", "--num_processes", "1", "--out_dir", str(tmp_path / "runs"),
         "--out", str(out)]
    )  # fmt: skip
    assert len(rows) == 1 and rows[0]["steps"] == 4
    scores = rows[0]["scores"]
    assert set(scores["text_to_image"]) >= {"single", "two_objects", "position", "count", "overall"}
    assert 0 <= scores["digits"]["accuracy"] <= 1
    assert json.loads(out.read_text())[0]["run"] == "target"
