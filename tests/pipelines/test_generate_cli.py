"""`python -m pipelines.generate`: a fresh process loads the folder (no trust_remote_code), writes a grid."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ar_model.generator import MMGenerator
from pipelines.generate import main


def test_a_fresh_process_loads_the_folder_and_writes_the_grid(model_dir, tmp_path):
    out = tmp_path / "grid.png"
    cmd = [sys.executable, "-m", "pipelines.generate", "--model", str(model_dir), "--prompt", "a red circle"]
    cmd += ["--out", str(out), "--num_images", "4", "--seed", "0", "--upscale", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote 4 image(s)" in run.stdout
    grid = np.asarray(Image.open(out))
    # make_grid: 2 × 2 tiles of 32 px with 2 px padding
    assert grid.shape == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2, 3)
    images = MMGenerator.from_pretrained(model_dir).text_to_image(
        ["a red circle"], num_images_per_prompt=4, seed=0
    )
    first = images[0].permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
    assert np.array_equal(grid[2:34, 2:34], first)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_images", "0"], "--num_images must be ≥ 1"),
        (["--out", "x.jpg"], "--out must be a .png file"),
        (["--guidance_scale", "-2"], "--guidance_scale must be ≥ 0"),
        (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (["--height", "abc"], "--height must be a int"),
        (["--num_candidates", "0"], "--num_candidates must be ≥ 1"),
        (["--cfg_schedule", "cosine"], "invalid choice: 'cosine'"),
    ],
)
def test_bad_arguments_are_refused_before_loading(argv, message, capsys, tmp_path):
    base = {
        "--model": str(tmp_path / "nowhere"),
        "--prompt": "a red circle",
        "--out": str(tmp_path / "o.png"),
    }
    for key, value in zip(argv[::2], argv[1::2]):
        base[key] = value
    with pytest.raises(SystemExit):
        main([x for kv in base.items() for x in kv])
    assert message in capsys.readouterr().err


def test_a_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises((OSError, ValueError), match="nowhere"):
        main(["--model", str(tmp_path / "nowhere"), "--prompt", "a", "--out", str(tmp_path / "o.png")])


def test_reranking_and_the_cfg_schedule_reach_the_pipeline(model_dir, tmp_path):
    out = tmp_path / "best.png"
    argv = ["--model", str(model_dir), "--prompt", "a red circle", "--out", str(out), "--num_images", "1"]
    main([*argv, "--num_candidates", "3", "--cfg_schedule", "linear", "--guidance_scale", "2", "--upscale=1"])
    gen = MMGenerator.from_pretrained(model_dir)
    kw = dict(seed=0, guidance_scale=2.0, cfg_schedule="linear")
    best = gen.text_to_image(["a red circle"], num_candidates=3, **kw)[0].permute(1, 2, 0).numpy()
    grid = np.asarray(Image.open(out))
    assert np.array_equal(grid[2:34, 2:34], best)
    plain = gen.text_to_image(["a red circle"], **kw)[0].permute(1, 2, 0).numpy()
    assert not np.array_equal(best, plain)  # with this model and seed another candidate wins
