"""Tests for the data.build CLI and its build() function."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_helpers import encode, noise_rgb

from data.build import build, main
from data.digits import generate_digits
from data.readers import open_samples
from data.shapes import generate_shapes
from data.writers import read_dataset_info

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "data.build", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def test_cli_webdataset(tmp_path):
    out = tmp_path / "shapes"
    args = [
        "--dataset",
        "shapes",
        "--num",
        "50",
        "--format",
        "webdataset",
        "--seed",
        "3",
        "--shard_size",
        "20",
    ]
    result = _run(*args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote 50 samples (0 skipped) to {out} [webdataset, 3 shards]"
    back = list(open_samples(out))
    expected = list(generate_shapes(50, 32, seed=3))
    assert [s.caption for s in back] == [s.caption for s in expected]
    assert np.array_equal(np.asarray(back[17].image), np.asarray(expected[17].image))
    info = read_dataset_info(out)
    assert (info["source"], info["num"], info["seed"], info["resolution"]) == ("shapes", 50, 3, 32)


def test_cli_hf(tmp_path):
    out = tmp_path / "digits"
    args = ["--dataset", "digits", "--num", "50", "--resolution", "16", "--format", "hf", "--split", "test"]
    result = _run(*args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "wrote 50 samples" in result.stdout
    back = list(open_samples(out))
    expected = list(generate_digits(50, 16, split="test"))
    assert [s.meta for s in back] == [s.meta for s in expected]
    assert back[0].image.size == (16, 16)
    assert read_dataset_info(out)["split"] == "test"


def test_cli_bad_arguments_exit_non_zero_with_a_message(tmp_path):
    result = _run("--dataset", "mnist", "--num", "5", "--out", str(tmp_path / "x"))
    assert result.returncode != 0
    assert "unknown dataset 'mnist'" in result.stderr and "shapes, digits, photos" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "shapes", "--num", "0"], "--num must be >= 1"),
        (["--dataset", "shapes", "--num", "5", "--resolution", "4"], "between 8 and 1024"),
        (["--dataset", "shapes", "--num", "5", "--resolution", "4096"], "between 8 and 1024"),
        (["--dataset", "shapes", "--num", "5", "--shard_size", "0"], "--shard_size must be >= 1"),
        (["--dataset", "nope/dir", "--num", "5"], "or the path of an image folder"),
    ],
)
def test_main_validates_before_working(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_main_rejects_unknown_format(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--dataset", "shapes", "--num", "5", "--format", "zip", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "invalid choice: 'zip'" in capsys.readouterr().err


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    build("shapes", 5, 16, "webdataset", out, progress=False)
    with pytest.raises(ValueError, match="--overwrite"):
        build("shapes", 5, 16, "webdataset", out, progress=False)
    result = build("shapes", 7, 16, "hf", out, overwrite=True, progress=False)
    assert result.count == 7 and read_dataset_info(out)["format"] == "hf"
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("do not delete")
    with pytest.raises(ValueError, match="does not look like a dataset"):
        build("shapes", 5, 16, "webdataset", tmp_path / "precious", overwrite=True, progress=False)
    assert (tmp_path / "precious" / "thesis.tex").exists()


def test_build_from_an_image_folder(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(4):
        (src / f"p{i}.png").write_bytes(encode(noise_rgb(i, 40)))
        (src / f"p{i}.txt").write_text(f"picture {i}")
    (src / "q_broken.png").write_bytes(b"garbage")  # sorts after p0..p3
    result = build(str(src), 3, 16, "webdataset", tmp_path / "out", progress=False)
    assert (result.count, result.skipped) == (3, 0)
    result = build(str(src), 10, 16, "webdataset", tmp_path / "out2", progress=False)
    assert (result.count, result.skipped) == (4, 1)
    samples = list(open_samples(tmp_path / "out2"))
    assert [s.caption for s in samples] == [f"picture {i}" for i in range(4)]
    assert all(s.image.size == (16, 16) for s in samples)
    assert read_dataset_info(tmp_path / "out2")["skipped"] == {"corrupt": 1}
