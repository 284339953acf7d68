"""Every shipped Stage-2 training config parses and its decoder settings build (the GPU ones included,
which no CPU test trains)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ar_model.config import ATTN_IMPLS
from ar_model.presets import count_parameters, preset_config
from ar_model.train import TrainConfig
from tokenizers_mm.config_io import load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "ar_model" / "configs"
TRAIN_CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("accelerate"))
# Discrete-token configs; shapes_kl_cpu.yaml needs a continuous tokenizer and is parsed (and compared
# with shapes_cpu.yaml) in test_ar_train_continuous.py.
DISCRETE = [p for p in TRAIN_CONFIGS if "diffusion_head" not in p.read_text()]


def test_the_shipped_configs_are_found():
    assert {p.name for p in TRAIN_CONFIGS} >= {"shapes_cpu.yaml", "shapes_kl_cpu.yaml", "base_gpu.yaml"}
    assert {p.name for p in DISCRETE} >= {"shapes_cpu.yaml", "base_gpu.yaml"}


@pytest.mark.parametrize("path", DISCRETE, ids=lambda p: p.name)
def test_every_shipped_decoder_config_builds(path, tokenizer_dir):
    cfg = load_config(TrainConfig, path, ["--tokenizer", str(tokenizer_dir)])
    assert cfg.max_steps > 0 and cfg.tokens_per_batch >= cfg.max_len
    overrides = {k: v for k, v in cfg.model.items() if k in ("rope_scheme", "attn_impl", "image_attention")}
    model = preset_config(cfg.preset, **overrides)
    assert model.attn_impl in ATTN_IMPLS and count_parameters(model) > 0
    if "gpu" not in path.name:  # flex_attention has no CPU backward: CPU configs must not ask for it
        assert model.attn_impl != "flex"
