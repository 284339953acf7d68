"""Atomic training checkpoints on top of accelerate's ``save_state``/``load_state``.

A checkpoint is written into ``checkpoints/.tmp-step-N``, flushed to disk, and renamed to
``checkpoints/step-N`` only when complete (``trainer_state.json`` last), so a process killed
mid-write leaves the previous checkpoint loadable; old checkpoints are renamed away before they are
deleted. accelerate saves the model as safetensors and loads optimizer, scheduler and RNG state
with ``torch.load(weights_only=True)``; our own trainer state is JSON. Nothing here unpickles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first (temp dirs are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / TRAINER_STATE).is_file()]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(
    accelerator: Any,
    output_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    keep: int = 2,
) -> Path:
    """Save accelerate state, ``trainer_state`` and extra tensors atomically; keep the last ``keep``.

    Must be called on every process (accelerate writes per-process RNG files).
    """
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".*-step-*"):  # left by a process killed while saving or deleting
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        for name, tensors in (extra_tensors or {}).items():
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                str(tmp / f"{name}.safetensors"),
            )
        atomic_write_text(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # only after a resume from an older step: retire it before the rename
            _remove(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def _remove(ckpt: Path) -> None:
    """Delete a checkpoint folder by renaming it out of sight first, so a kill mid-delete never leaves
    a ``step-N`` folder that looks complete but lacks files."""
    trash = ckpt.with_name(f".del-{ckpt.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(ckpt, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` (and the folders) to disk before the rename publishes them."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def load_checkpoint(
    accelerator: Any, ckpt: Path
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Restore accelerate state from ``ckpt``; return the trainer state and the extra safetensors files."""
    from accelerate.utils import load

    # accelerate skips an unreadable RNG file with a log line and resumes with the wrong RNG state;
    # read it first (weights_only=True, as accelerate does) so a corrupt or planted file is an error.
    load(ckpt / f"random_states_{accelerator.process_index}.pkl")
    accelerator.load_state(str(ckpt))
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    extras = {p.stem: load_file(str(p)) for p in ckpt.glob("*.safetensors") if not p.stem.startswith("model")}
    return state, extras


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file via a temp file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``path`` (replacing an older folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
