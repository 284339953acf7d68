"""The guarded optimizer step (and the EMA copy) shared by the training loops of both stages.

A non-finite loss (on any rank) or gradient norm skips the update; every rank takes the same branch
and runs the same collectives, or DDP's collectives would deadlock. :class:`NonfiniteGuard` counts
skipped steps and stops the run after ``max_in_a_row`` consecutive ones. :func:`check_finite_weights`
runs before every checkpoint and final save, so no non-finite weights are ever written (a finite
gradient can still overflow a weight, and an EMA copy never sees the loss).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from accelerate.utils import DistributedType
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def guarded_update(
    accelerator,
    loss: torch.Tensor,
    params: Iterable[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler,
    grad_clip: float,
) -> bool:
    """Backward, clip and step inside ``accelerator.accumulate``; returns True if the update was skipped.

    Every rank runs backward, also on a non-finite loss, so all ranks run the same collectives. Whether
    any rank's loss was non-finite travels in an all-reduce that starts before backward and is awaited
    after it: it adds no synchronization point of its own (the gradient all-reduce already is one), where
    a blocking check before backward made every rank wait for the slowest forward once more per step.
    A non-finite loss on a micro-step without synchronization leaves non-finite accumulated gradients,
    so the whole accumulated step is skipped at its clip. Under DeepSpeed, whose engine steps inside
    ``accelerator.backward``, the loss check stays a blocking all-reduce before backward.
    """
    flag = torch.isfinite(loss.detach()).logical_not().float()  # () 1.0 when this rank's loss is bad
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed's engine steps inside accelerator.backward: decide before it, as a blocking check.
        bad = bool(accelerator.reduce(flag, "max") > 0)
        if not bad:
            accelerator.backward(loss)
    else:
        pending = None
        if accelerator.num_processes > 1:
            pending = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, async_op=True)
        accelerator.backward(loss)
        if pending is not None:
            pending.wait()
        bad = bool(flag > 0)
    if not bad and accelerator.sync_gradients:
        gnorm = accelerator.clip_grad_norm_(params, grad_clip)
        bad = not torch.isfinite(torch.as_tensor(gnorm))
    if not bad:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return bad


class NonfiniteGuard:
    """Counts skipped (non-finite) optimizer steps; raises after ``max_in_a_row`` in a row."""

    def __init__(self, max_in_a_row: int, total: int = 0):
        self.max_in_a_row, self.total, self.in_a_row = max_in_a_row, total, 0

    def record(self, bad: bool, step: int, log=print) -> bool:
        """Record optimizer step ``step``; returns ``bad`` (the caller skips the rest of the step)."""
        if not bad:
            self.in_a_row = 0
            return False
        self.total += 1
        self.in_a_row += 1
        log(f"step {step}: non-finite loss or gradient, update skipped ({self.total} total)")
        if self.in_a_row >= self.max_in_a_row:
            raise RuntimeError(
                f"{self.in_a_row} non-finite steps in a row at step {step}; stopping. "
                "Lower lr or check the data."
            )
        return True


def nonfinite_weights(module: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``module`` holding NaN or inf (local shards)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [n for n, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite_weights(accelerator, modules: dict[str, torch.nn.Module | None], where: str) -> None:
    """Raise on every rank if any rank holds a non-finite weight; call before writing ``where``."""
    bad = [f"{label}.{n}" for label, m in modules.items() if m is not None for n in nonfinite_weights(m)]
    flag = torch.tensor(float(bool(bad)), device=accelerator.device)
    if accelerator.reduce(flag, "max") > 0:
        raise RuntimeError(
            f"non-finite weights ({', '.join(bad[:5]) or 'on another process'}) before writing {where}; "
            "nothing was saved. Lower lr or check the data."
        )


def ema_copy(model: torch.nn.Module, decay: float, device: torch.device) -> AveragedModel:
    """An exponential moving average of ``model``'s weights (and buffers) on the training ``device``.

    Built before ``accelerator.prepare`` moves ``model``, so the device must be named: a copy left on
    the CPU would make every update a device-to-host copy of the weights and the final evaluation a CPU
    run (seen on a GPU: a 55M tokenizer's final evaluation took minutes).
    """
    return AveragedModel(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
