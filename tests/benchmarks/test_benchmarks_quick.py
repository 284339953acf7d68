"""The committed benchmark scripts run in --quick mode so they cannot rot. Their timings are not
asserted (timings belong in the README, measured as ratios); their JSON output and checks are."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_bench_quantizers_quick():
    rows = _run("bench_quantizers.py")
    assert rows and rows[0]["bench"] == "quantizers"


@pytest.mark.slow
def test_tokenizer_targets_quick(tmp_path):
    rows = _run("tokenizer_targets.py", "--only", "fsq_8x8", "patches_4", "--out", str(tmp_path))
    assert [r["run"] for r in rows] == ["fsq_8x8", "patches_4"]
    assert rows[1]["photos_psnr"] > 90  # raw patches are lossless
