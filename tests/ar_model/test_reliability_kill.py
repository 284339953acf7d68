"""Kill -9 a real 2-process Stage-2 run (during training, during a checkpoint write), then resume.

Each run is ``accelerate launch`` with two CPU processes (gloo, fp32). The resumed run's final weights
must equal an uninterrupted run's bitwise: the data position is a pure function of the step, and
optimizer, scheduler, per-process RNG and EMA state come back from the checkpoint. Faults are
injected by ``tests/fault_launch.py`` at a fixed step, so the test never races the run.
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

MAX_STEPS, SAVE_EVERY = 12, 4


def _cmd(tokenizer_dir: Path, run: Path, *extra: str) -> list[str]:
    args = [
        FAULT_LAUNCH, "ar_model.train", "--tokenizer", str(tokenizer_dir), "--preset", "tiny",
        "--model", json.dumps({"hidden_size": 64, "num_layers": 2, "num_heads": 2}),
        "--train_data", "[shapes, digits]", "--train_num", "96", "--val_data", "[]",
        "--max_len", "256", "--tokens_per_batch", "512", "--max_steps", str(MAX_STEPS),
        "--warmup_steps", "2", "--lr", "3e-3", "--ema_decay", "0.9", "--log_every", "1",
        "--save_every", str(SAVE_EVERY), "--eval_every", "0", "--num_sample_prompts", "0",
        "--output_dir", str(run), *extra,
    ]  # fmt: skip
    return launch_cmd(args)


def _finish(cmd: list[str], **env: str) -> None:
    proc = run_launch(cmd, cpu_env(**env))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def reference(tokenizer_dir, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("ref") / "run"
    _finish(_cmd(tokenizer_dir, run))
    return run


def _assert_same_final(run: Path, reference: Path) -> None:
    # The final folder holds the EMA weights, so this also checks the EMA state came back.
    full = load_file(reference / "final" / "model.safetensors")
    resumed = load_file(run / "final" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == MAX_STEPS
    assert metrics["tokens_seen"] == ref_metrics["tokens_seen"]  # no batch repeated or skipped


def test_sigkill_during_training_then_resume_matches_the_uninterrupted_run(
    tmp_path, tokenizer_dir, reference
):
    run, faults = tmp_path / "run", tmp_path / "faults"
    faults.mkdir()
    # Hang 3 optimizer steps after the step-4 checkpoint (steps 5-7 done, mid-epoch), then kill -9.
    env = cpu_env(FAULT=f"hang:{SAVE_EVERY}:3", FAULT_DIR=str(faults))
    proc = run_until(
        _cmd(tokenizer_dir, run), env, lambda: len(list(faults.glob("hung-rank*"))) == 2, tmp_path / "log"
    )
    kill_group(proc)
    assert [p.name for p in list_checkpoints(run)] == ["step-4"]
    assert not (run / "final").exists()
    killed = _losses(run)
    assert [s for s, _ in killed] == list(range(1, 8))  # steps 5-7 were done and are lost

    _finish(_cmd(tokenizer_dir, run, "--resume", "true"))
    _assert_same_final(run, reference)
    # The resumed run redid steps 5..12 on the same batches: its losses equal the killed run's
    # (steps 5-7) and the uninterrupted run's (all steps), bitwise.
    resumed = _losses(run)[len(killed) :]
    assert [s for s, _ in resumed] == list(range(5, MAX_STEPS + 1))
    assert resumed[:3] == killed[4:]
    assert _losses(reference) == killed[:4] + resumed


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, tokenizer_dir, reference):
    run, faults = tmp_path / "run", tmp_path / "faults"
    faults.mkdir()
    # The main process dies half-way through optimizer.bin of the step-8 checkpoint.
    env = cpu_env(FAULT=f"kill_in_save:{2 * SAVE_EVERY}", FAULT_DIR=str(faults))
    proc = run_launch(_cmd(tokenizer_dir, run), env)
    assert proc.returncode != 0 and (faults / "killed").is_file(), proc.stderr[-3000:]
    partial = run / "checkpoints" / ".tmp-step-8"
    assert (partial / "model.safetensors").is_file() and (partial / "optimizer.bin").is_file()
    assert not (partial / "trainer_state.json").exists()
    assert [p.name for p in list_checkpoints(run)] == ["step-4"]  # the half-written one is invisible

    _finish(_cmd(tokenizer_dir, run, "--resume", "true"))
    _assert_same_final(run, reference)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-8"]
