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
    # the sampling sweep on the trained folder, with every setting field
    sweep = _load("stage2_sampling_sweep").main(
        ["--model", str(tmp_path / "runs" / "target" / "final"),
         "--settings", "1.5:1.0", "2.0:0.8:5:0.9:linear", "--n_per_category", "1", "--n_digits", "1",
         "--num_candidates", "1", "2"]
    )  # fmt: skip
    assert [(r["cfg"], r["top_k"], r["top_p"], r["cfg_schedule"], r["num_candidates"]) for r in sweep] == [
        (1.5, None, None, "constant", 1),
        (1.5, None, None, "constant", 2),
        (2.0, 5, 0.9, "linear", 1),
        (2.0, 5, 0.9, "linear", 2),
    ]
    assert all(0 <= r["single"] <= 1 and 0 <= r["digits"] <= 1 for r in sweep)
    assert set(sweep[0]["single_fails"]) == {"color", "shape", "count", "size", "position"}
    assert "num_inference_steps" not in sweep[0]
    # the generalization gap on the same run: per source, train and held-out losses and their difference
    gap = _load("stage2_generalization_gap").main(["--run", str(tmp_path / "runs" / "target"), "--n", "4"])
    assert {r["source"] for r in gap} == {"shapes", "digits"}
    for r in gap:
        for key in ("loss", "image_loss", "caption_loss"):
            assert r[f"train_{key}"] > 0 and r[f"heldout_{key}"] > 0
            assert r[f"gap_{key}"] == pytest.approx(r[f"heldout_{key}"] - r[f"train_{key}"], abs=2e-4)
    with pytest.raises(SystemExit):
        _load("stage2_generalization_gap").main(["--run", str(tmp_path / "runs" / "target"), "--n", "0"])
    with pytest.raises(SystemExit):
        _load("stage2_sampling_sweep").main(["--model", "unused", "--num_candidates", "0"])
    with pytest.raises(SystemExit):  # diffusion-head options on a code model are refused, not ignored
        _load("stage2_sampling_sweep").main(
            ["--model", str(tmp_path / "runs" / "target" / "final"), "--num_inference_steps", "8"]
        )


def test_sampling_sweep_settings_parse_and_reject():
    parse = _load("stage2_sampling_sweep").parse_setting
    assert parse("2.5:0.6") == {
        "guidance_scale": 2.5, "temperature": 0.6, "top_k": None, "top_p": None, "cfg_schedule": "constant"
    }  # fmt: skip
    assert parse("2:1:50:0.9:linear") == {
        "guidance_scale": 2.0, "temperature": 1.0, "top_k": 50, "top_p": 0.9, "cfg_schedule": "linear"
    }  # fmt: skip
    for bad in ("2.0", "2:0", "2:1:-1", "2:1:0:0", "2:1:0:1.5", "2:1:0:1:cosine", "2:1:0:1:linear:x"):
        with pytest.raises(ValueError):
            parse(bad)
