"""Kill -9 a real 2-process Stage-1 run (during training, during a checkpoint write), then resume.

The Stage-1 twin of ``tests/ar_model/test_reliability_kill.py``: ``accelerate launch`` with two CPU
processes (gloo, fp32), faults injected at a fixed step by ``tests/fault_launch.py``, and the resumed
run's final weights (EMA) equal to an uninterrupted run's, bitwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch_helpers import FAULT_LAUNCH, cpu_env, kill_group, launch_cmd, run_launch, run_until
from safetensors.torch import load_file

from tokenizers_mm.checkpoints import list_checkpoints

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

TINY_MODEL = {"base_channels": 8, "channel_mult": [1, 2, 2], "mid_blocks": 0, "norm_groups": 4}
MAX_STEPS, SAVE_EVERY = 12, 4


def _cmd(run: Path, *extra: str) -> list[str]:
    args = [
        FAULT_LAUNCH, "tokenizers_mm.train", "--preset", "fsq-8x8", "--model", json.dumps(TINY_MODEL),
        "--train_num", "128", "--eval_num", "16", "--batch_size", "16", "--max_steps", str(MAX_STEPS),
        "--warmup_steps", "2", "--lr", "3e-3", "--ema_decay", "0.9", "--log_every", "1",
        "--save_every", str(SAVE_EVERY), "--output_dir", str(run), *extra,
    ]  # fmt: skip
    return launch_cmd(args)


def _finish(cmd: list[str]) -> None:
    proc = run_launch(cmd, cpu_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("ref") / "run"
    _finish(_cmd(run))
    return run


def _assert_same_final(run: Path, reference: Path) -> None:
    full = load_file(reference / "final" / "model.safetensors")
    resumed = load_file(run / "final" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert json.loads((run / "metrics.json").read_text())["num_processes"] == 2


def test_sigkill_during_training_then_resume_matches_the_uninterrupted_run(tmp_path, reference):
    run, faults = tmp_path / "run", tmp_path / "faults"
    faults.mkdir()
    # Hang 3 optimizer steps after the step-4 checkpoint (steps 5-7 done, mid-epoch), then kill -9.
    env = cpu_env(FAULT=f"hang:{SAVE_EVERY}:3", FAULT_DIR=str(faults))
    proc = run_until(_cmd(run), env, lambda: len(list(faults.glob("hung-rank*"))) == 2, tmp_path / "log")
    kill_group(proc)
    assert [p.name for p in list_checkpoints(run)] == ["step-4"]
    assert not (run / "final").exists()
    killed = _losses(run)
    assert [s for s, _ in killed] == list(range(1, 8))

    _finish(_cmd(run, "--resume", "true"))
    _assert_same_final(run, reference)
    resumed = _losses(run)[len(killed) :]  # steps 5..12 again, on the same batches
    assert [s for s, _ in resumed] == list(range(5, MAX_STEPS + 1))
    assert resumed[:3] == killed[4:]
    assert _losses(reference) == killed[:4] + resumed


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, reference):
    run, faults = tmp_path / "run", tmp_path / "faults"
    faults.mkdir()
    env = cpu_env(FAULT=f"kill_in_save:{2 * SAVE_EVERY}", FAULT_DIR=str(faults))
    proc = run_launch(_cmd(run), env)
    assert proc.returncode != 0 and (faults / "killed").is_file(), proc.stderr[-3000:]
    assert (run / "checkpoints" / ".tmp-step-8" / "optimizer.bin").is_file()  # half-written
    assert [p.name for p in list_checkpoints(run)] == ["step-4"]

    _finish(_cmd(run, "--resume", "true"))
    _assert_same_final(run, reference)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-8"]


def test_a_nan_loss_on_one_rank_skips_the_step_on_both(tmp_path, reference):
    """Rank 1 alone sees a NaN loss at step 3, with finite gradients, so that the averaged gradient
    cannot tell: both ranks skip that update (the loss flag's all-reduce runs beside backward) and stay
    bitwise identical; the run finishes and counts the skip."""
    run = tmp_path / "run"
    env = cpu_env(FAULT="nan_value:1:3", FAULT_DIR=str(tmp_path))
    proc = run_launch(_cmd(run, "--save_every", "0"), env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 3: non-finite loss or gradient, update skipped (1 total)" in proc.stdout + proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["nonfinite_steps_skipped"] == 1
    digests = metrics["rank_param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert [s for s, _ in _losses(run)] == [1, 2, *range(4, MAX_STEPS + 1)]
    assert _losses(run)[:2] == _losses(reference)[:2]
    ref = load_file(reference / "final" / "model.safetensors")
    ours = load_file(run / "final" / "model.safetensors")
    assert not all(torch.equal(ref[k], ours[k]) for k in ref)  # the skipped update is missing
