"""Reliability of both trainers (Stage 1 and Stage 2) in real short in-process runs.

Non-finite losses, gradients and weights, and planted pickles in a resume checkpoint. Both trainers
share ``tokenizers_mm.train_step`` (the guarded update, the guard, the finite-weights check) and
``tokenizers_mm.checkpoints``, so each test runs once per trainer. NaN is injected through the trainer's own
``guarded_update`` reference (``fault_launch.poisoning_update``), so detection, skipping, counting and
stopping are the trainers' real code paths.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from fault_launch import PicklePayload, poisoning_update
from safetensors.torch import load_file
from tiny import TINY_TOKENIZER
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import ar_model.train as ar_train
import tokenizers_mm.train as tok_train
from tokenizers_mm.checkpoints import list_checkpoints


@pytest.fixture(params=["stage1", "stage2"])
def trainer(request, tokenizer_dir, tmp_path):
    """(trainer module, config factory) of one stage, writing to ``tmp_path/run``."""
    common = dict(warmup_steps=1, lr=3e-3, log_every=1, output_dir=str(tmp_path / "run"))
    if request.param == "stage1":
        base = dict(preset="fsq-8x8", model=TINY_TOKENIZER, train_num=64, eval_num=16, batch_size=16)
        return tok_train, lambda **kw: tok_train.TrainConfig(**{**common, **base, **kw})
    base = dict(
        tokenizer=str(tokenizer_dir),
        preset="tiny",
        model={"hidden_size": 32, "num_layers": 1, "num_heads": 2},
        train_data=["shapes"],
        train_num=48,
        val_data=[],
        max_len=128,
        tokens_per_batch=256,
        eval_every=0,
        num_sample_prompts=0,
    )
    return ar_train, lambda **kw: ar_train.TrainConfig(**{**common, **base, **kw})


def _all_finite(run: Path) -> None:
    """Every safetensors file the run wrote (checkpoints, EMA, final) holds finite floats only."""
    files = sorted(run.rglob("*.safetensors"))
    assert files
    for f in files:
        for name, t in load_file(f).items():
            assert not t.is_floating_point() or torch.isfinite(t).all(), f"{f}: {name}"


def _adam_steps(ckpt: Path) -> int:
    state = torch.load(ckpt / "optimizer.bin", weights_only=True)["state"]
    return int(state[0]["step"])


def test_non_finite_steps_are_skipped_and_counted(trainer, tmp_path, monkeypatch, capsys):
    module, cfg = trainer
    # Step 3: NaN loss. Step 6: a finite loss whose gradient is NaN.
    monkeypatch.setattr(
        module, "guarded_update", poisoning_update(module.guarded_update, {3: "nan_loss", 6: "nan_grad"})
    )
    metrics = module.main(cfg(max_steps=9, save_every=4, ema_decay=0.9))
    run = tmp_path / "run"
    assert metrics["nonfinite_steps_skipped"] == 2
    out = capsys.readouterr().out
    assert "step 3: non-finite loss or gradient, update skipped (1 total)" in out
    assert "step 6: non-finite loss or gradient, update skipped (2 total)" in out
    logged = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 4, 5, 7, 8, 9]
    # The skipped updates never reached the optimizer: AdamW counted 3 of 4 and 6 of 8 steps.
    ckpts = list_checkpoints(run)
    assert [c.name for c in ckpts] == ["step-4", "step-8"]
    assert [_adam_steps(c) for c in ckpts] == [3, 6]
    assert [json.loads((c / "trainer_state.json").read_text())["nonfinite_total"] for c in ckpts] == [1, 2]
    _all_finite(run)


def test_run_stops_after_max_nonfinite_in_a_row(trainer, tmp_path, monkeypatch):
    module, cfg = trainer
    poison = dict.fromkeys(range(5, 100), "nan_loss")
    monkeypatch.setattr(module, "guarded_update", poisoning_update(module.guarded_update, poison))
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row at step 7; stopping"):
        module.main(cfg(max_steps=20, save_every=2, max_nonfinite=3))
    run = tmp_path / "run"
    assert [c.name for c in list_checkpoints(run)] == ["step-2", "step-4"]  # step 6 was skipped
    assert not (run / "final").exists()
    _all_finite(run)


@pytest.mark.parametrize("corrupt_at, where", [(6, "checkpoint step-8"), (9, "the final folder")])
def test_non_finite_weights_are_never_saved(trainer, tmp_path, monkeypatch, corrupt_at, where):
    """An inf that no loss sees (here in the EMA copy) is caught before a checkpoint or the final folder."""
    module, cfg = trainer

    class CorruptingEMA(AveragedModel):
        def update_parameters(self, model):
            super().update_parameters(model)
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == corrupt_at:
                with torch.no_grad():
                    first = next(self.module.parameters())  # NHWC for a tokenizer: no .view(-1)
                    first[(0,) * first.dim()] = float("inf")

    def corrupting_ema_copy(model, decay, device):
        return CorruptingEMA(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    monkeypatch.setattr(module, "ema_copy", corrupting_ema_copy)
    with pytest.raises(
        RuntimeError, match=rf"non-finite weights \(ema\.module\.[\w.]+\) before writing {where}"
    ):
        module.main(cfg(max_steps=9, save_every=4, ema_decay=0.9))
    run = tmp_path / "run"
    saved = ["step-4"] if corrupt_at == 6 else ["step-4", "step-8"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == saved  # no temp folder either
    assert not (run / "final").exists()
    _all_finite(run)


def test_the_planted_payload_is_live(tmp_path):
    """Control for the refusal tests: loaded without ``weights_only`` the payload does run."""
    PicklePayload(tmp_path / "pwned").save(tmp_path / "evil.bin")
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert (tmp_path / "pwned").read_text() == "pwned"


@pytest.mark.parametrize(
    "planted", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "pytorch_model.bin"]
)
def test_resume_refuses_a_pickle_planted_in_the_checkpoint(trainer, tmp_path, planted):
    module, cfg = trainer
    module.main(cfg(max_steps=3, save_every=2))
    (ckpt,) = list_checkpoints(tmp_path / "run")
    assert (ckpt / planted).is_file() or planted == "pytorch_model.bin"
    if planted == "pytorch_model.bin":  # weights as a torch file instead of safetensors
        (ckpt / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    PicklePayload(marker).save(ckpt / planted)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        module.main(cfg(max_steps=3, save_every=2, resume=True))
    assert not marker.exists()
