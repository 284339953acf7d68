"""Upload a folder to a Hub model repo as one commit (both trainers, ``MMGenerator.push_to_hub``).

Built on ``huggingface_hub``: ``create_repo`` (if needed), ``create_branch`` for a named revision,
then one ``create_commit`` with a ``CommitOperationAdd`` per file, paths relative to the folder
(under ``path_in_repo`` if given, e.g. ``checkpoints/step-500``). The offline tests replace exactly
those three HTTP calls.
"""

from __future__ import annotations

import os
from pathlib import Path

LIBRARY_NAME = "mmgen-toolkit"


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    path_in_repo: str = "",
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload folder",
):
    """Upload every file under ``folder`` to ``repo_id`` in one commit; returns the ``CommitInfo``."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"push_folder: {folder} is not a folder")
    prefix = path_in_repo.strip("/")
    api = HfApi(token=token, library_name=LIBRARY_NAME)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [
        CommitOperationAdd(
            path_in_repo="/".join(p for p in (prefix, path.relative_to(folder).as_posix()) if p),
            path_or_fileobj=str(path),
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]
    if not operations:
        raise ValueError(f"push_folder: {folder} holds no files")
    return api.create_commit(
        repo_id, operations, commit_message=commit_message, revision=revision, create_pr=create_pr
    )


def push_checkpoint(ckpt: str | os.PathLike, repo_id: str, *, private: bool | None = None) -> bool:
    """Upload a training checkpoint to ``repo_id`` under ``checkpoints/<its folder name>``.

    A failed upload (network, auth) is reported and training goes on: the checkpoint is safe on
    disk and the next save tries again. Returns whether the upload succeeded.
    """
    ckpt = Path(ckpt)
    try:
        push_folder(
            ckpt,
            repo_id,
            path_in_repo=f"checkpoints/{ckpt.name}",
            private=private,
            commit_message=f"checkpoint {ckpt.name}",
        )
    except Exception as e:  # noqa: BLE001  (any upload failure must not stop a training run)
        print(f"WARNING: could not push {ckpt} to {repo_id}: {type(e).__name__}: {e}", flush=True)
        return False
    return True
