"""Run a trainer's ``main`` with one injected fault, for the kill -9 tests (a script for `accelerate launch`).

    accelerate launch ... tests/fault_launch.py ar_model.train --key value ...

The fault is read from the environment, so the trainer's own arguments pass through untouched:

* ``FAULT=hang:K:N`` — after the checkpoint of step K is saved, run N more optimizer steps, then
  every rank writes ``FAULT_DIR/hung-rank{R}`` and sleeps. The test SIGKILLs the process group
  there: the checkpoint of step K is on disk and N steps past it are lost. A hook, not a race:
  polling for a checkpoint and killing "soon after" would sometimes kill a finished run.
* ``FAULT=nan_value:R:N`` — on rank R only, the N-th ``guarded_update`` call (1-based) sees a NaN
  loss with finite gradients (:func:`poisoning_update`'s ``"nan_value"``); the other ranks' losses
  stay finite. Only the loss check can tell, and every rank must skip.
* ``FAULT=kill_in_save:K`` — while the checkpoint of step K is written, the main process writes
  half of ``optimizer.bin``, writes ``FAULT_DIR/killed`` and SIGKILLs itself (the launcher then
  takes down the other ranks).

Only the trainer module's references to ``save_checkpoint`` and ``guarded_update`` and accelerate's
``checkpointing.save`` are wrapped; the training code itself runs unchanged. In-process tests import
:func:`poisoning_update` (non-finite losses and gradients) and :class:`PicklePayload` (a hostile
pickle) from here.
"""

from __future__ import annotations

import importlib
import io
import os
import signal
import sys
import time
from pathlib import Path

import torch


class PicklePayload:
    """Unpickling this object writes ``marker``: what a malicious checkpoint or dataset would do.

    The pickle refers only to ``builtins.exec``, so it runs wherever it is unpickled.
    """

    def __init__(self, marker: str | os.PathLike):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)

    def save(self, path: str | os.PathLike) -> None:
        """Write a torch file (zip + data.pkl) whose tensors dict holds the payload."""
        torch.save({"weight": self}, path)


def plant_remote_code(folder: str | os.PathLike, marker: str | os.PathLike) -> None:
    """Make a model folder ask for its own code: ``auto_map`` in ``config.json`` pointing at modules
    in the folder that write ``marker`` when imported (what ``trust_remote_code=True`` would run)."""
    import json

    folder = Path(folder)
    code = f"open({str(marker)!r}, 'w').write('pwned')\n"
    (folder / "configuration_evil.py").write_text(
        code + "from transformers import PretrainedConfig as Evil\n"
    )
    (folder / "modeling_evil.py").write_text(code + "from transformers import PreTrainedModel as Evil\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.Evil",
        **{auto: "modeling_evil.Evil" for auto in ("AutoModel", "AutoModelForCausalLM")},
    }
    (folder / "config.json").write_text(json.dumps(config))


def poisoning_update(orig_update, poison: dict[int, str]):
    """Wrap a trainer's ``guarded_update`` so that its ``n``-th call (1-based) sees a poisoned loss.

    ``poison[n]`` is ``"nan_loss"`` (the loss is NaN, and so is its gradient), ``"nan_value"`` (the loss
    is NaN, its gradient finite: a NaN constant is added) or ``"nan_grad"`` (the loss stays finite, its
    gradient is NaN: d sqrt(u)/du is inf at u = 0, times d|x|/dx = 0). Calls are counted in ``.calls``.
    """

    def update(accelerator, loss, *args, **kwargs):
        update.calls += 1
        kind = poison.get(update.calls)
        if kind == "nan_loss":
            loss = loss * float("nan")
        elif kind == "nan_value":
            loss = loss + float("nan")
        elif kind == "nan_grad":
            loss = loss + torch.sqrt((loss * 0).abs())
            assert torch.isfinite(loss)
        elif kind is not None:
            raise ValueError(f"unknown poison {kind!r}")
        return orig_update(accelerator, loss, *args, **kwargs)

    update.calls = 0
    return update


def _install(module, fault: str, fault_dir: Path) -> None:
    kind, *args = fault.split(":")
    rank = int(os.environ.get("RANK", "0"))
    orig_save, orig_update = module.save_checkpoint, module.guarded_update

    if kind == "hang":
        k, extra = int(args[0]), int(args[1])
        state = {"armed": False, "updates": 0}

        def save_checkpoint(accelerator, output_dir, step, *a, **kw):
            path = orig_save(accelerator, output_dir, step, *a, **kw)
            state["armed"] = state["armed"] or step == k
            return path

        def guarded_update(*a, **kw):
            if state["armed"]:
                if state["updates"] == extra:
                    (fault_dir / f"hung-rank{rank}").touch()
                    time.sleep(3600)
                state["updates"] += 1
            return orig_update(*a, **kw)

        module.save_checkpoint, module.guarded_update = save_checkpoint, guarded_update
    elif kind == "kill_in_save":
        import accelerate.checkpointing as ckpt

        k = int(args[0])
        orig_acc_save = ckpt.save

        def dying_save(obj, f, *a, **kw):
            if not str(f).endswith("optimizer.bin"):
                return orig_acc_save(obj, f, *a, **kw)
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            data = buffer.getvalue()
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
            (fault_dir / "killed").touch()
            os.kill(os.getpid(), signal.SIGKILL)

        def save_checkpoint(accelerator, output_dir, step, *a, **kw):
            if step == k:
                ckpt.save = dying_save
            return orig_save(accelerator, output_dir, step, *a, **kw)

        module.save_checkpoint = save_checkpoint
    elif kind == "nan_value":
        if rank == int(args[0]):
            module.guarded_update = poisoning_update(orig_update, {int(args[1]): "nan_value"})
    else:
        raise SystemExit(f"unknown FAULT {fault!r}")


if __name__ == "__main__":
    trainer = importlib.import_module(sys.argv[1])
    if os.environ.get("FAULT"):
        _install(trainer, os.environ["FAULT"], Path(os.environ["FAULT_DIR"]))
    trainer.main(trainer.parse_args(sys.argv[2:]))
    sys.exit(0)
