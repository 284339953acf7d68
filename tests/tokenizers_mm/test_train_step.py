"""The guarded optimizer step: non-finite losses and gradients never reach the weights."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from tokenizers_mm.train_step import NonfiniteGuard, guarded_update


def _setup():
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    return accelerator, model, opt, sched


@pytest.mark.parametrize("poison", ["nan_loss", "inf_grad"])
def test_non_finite_steps_leave_the_weights_untouched(poison):
    accelerator, model, opt, sched = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.ones(2, 4)
    if poison == "nan_loss":
        loss = model(x).sum() * float("nan")
    else:  # a finite loss (0) whose gradient is not: d sqrt(u)/du = inf at u = 0
        loss = torch.sqrt((model(x) * 0).abs()).sum()
        assert torch.isfinite(loss)
    with accelerator.accumulate(model):
        bad = guarded_update(accelerator, loss, model.parameters(), opt, sched, grad_clip=1.0)
    assert bad
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step

    with accelerator.accumulate(model):
        bad = guarded_update(accelerator, model(x).sum(), model.parameters(), opt, sched, grad_clip=1.0)
    assert not bad
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_guard_counts_and_stops_after_too_many_in_a_row():
    guard = NonfiniteGuard(max_in_a_row=3)
    logged = []
    assert guard.record(True, 1, logged.append) and guard.record(True, 2, logged.append)
    assert not guard.record(False, 3, logged.append)  # a good step resets the run
    assert guard.record(True, 4, logged.append) and guard.record(True, 5, logged.append)
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row at step 6"):
        guard.record(True, 6, logged.append)
    assert guard.total == 5 and len(logged) == 5


def test_ema_copy_averages_weights_and_buffers() -> None:
    from tokenizers_mm.train_step import ema_copy

    model = torch.nn.BatchNorm1d(3)  # weights and buffers (running stats)
    ema = ema_copy(model, 0.9, torch.device("cpu"))
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(4.0)
    ema.update_parameters(model)  # the first update copies the model
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(5.0)
    ema.update_parameters(model)  # then ema = 0.9 ema + 0.1 model
    torch.testing.assert_close(ema.module.weight, torch.full((3,), 2.1))
    torch.testing.assert_close(ema.module.running_mean, torch.full((3,), 4.1))
    assert ema.module.weight.data_ptr() != model.weight.data_ptr()  # a copy, not the model
