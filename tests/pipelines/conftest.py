"""Fixtures for the pipeline tests.

* ``model_dir``: a real (tiny, briefly trained) MMGenerator folder, written by the Stage-2 trainer.
* ``fake_hub``: the one allowed fake, the Hub's HTTP layer. ``HfApi.create_repo``,
  ``create_branch``, ``create_commit`` and ``_validate_yaml`` are the calls that would go over the
  network. The fixture swaps them (monkeypatch) for versions that write each commit's files into
  the standard huggingface_hub cache layout (``models--user--repo/snapshots/<sha>/...`` and
  ``refs/<branch>``). Everything else is the real code: our ``push_to_hub`` (which builds
  the commit's operations) on the way up, ``snapshot_download``/``from_pretrained``/``pipeline`` with
  ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing at that cache on the way down.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import CommitInfo, HfApi, RepoUrl
from tiny import save_tiny_tokenizer, tiny_train_config

from ar_model.train import main


@pytest.fixture(scope="session")
def make_tokenizer():
    """``make_tokenizer(path, seed)``: a tiny untrained FSQ tokenizer folder (1000 codes, 32 px)."""
    return save_tiny_tokenizer


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mmgen")
    cfg = tiny_train_config(save_tiny_tokenizer(root / "tokenizer"), root / "run", log_every=10)
    main(cfg)
    return root / "run" / "final"


class FakeHub:
    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.commits: list[tuple[str, str, list[str]]] = []  # (repo_id, message, paths)
        self.validated: list[str] = []  # model cards checked by validate_yaml

    def repo_dir(self, repo_id: str) -> Path:
        return self.cache / f"models--{repo_id.replace('/', '--')}"

    def create_repo(self, api, repo_id, *, private=None, exist_ok=False, repo_type=None, **kwargs):
        if "/" not in repo_id:
            repo_id = f"user/{repo_id}"
        folder = self.repo_dir(repo_id)
        if folder.exists() and not exist_ok:
            raise FileExistsError(repo_id)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, api, repo_id, *, branch, exist_ok=False, **kwargs):
        return None

    def validate_yaml(self, api, content: str, **kwargs) -> None:
        """The server validates a README's YAML header; here: it must parse, as a mapping."""
        header = content.split("---")[1] if content.startswith("---") else ""
        if not isinstance(yaml.safe_load(header), dict):
            raise ValueError("README.md has no YAML metadata header")
        self.validated.append(content)

    def create_commit(self, api, repo_id, operations, *, commit_message, revision=None, **kwargs):
        folder = self.repo_dir(repo_id)
        branch = revision or "main"
        ref = folder / "refs" / branch
        files: dict[str, bytes] = {}
        if ref.exists():  # a commit adds to its parent's tree
            parent = folder / "snapshots" / ref.read_text()
            files = {str(p.relative_to(parent)): p.read_bytes() for p in parent.rglob("*") if p.is_file()}
        for op in operations:
            src = op.path_or_fileobj
            if isinstance(src, (str, Path)):
                data = Path(src).read_bytes()
            elif isinstance(src, bytes):
                data = src
            else:
                data = src.read() if isinstance(src, io.IOBase) else bytes(src)
            files[op.path_in_repo] = data
        digest = hashlib.sha1()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + files[name])
        sha = digest.hexdigest()
        snapshot = folder / "snapshots" / sha
        if snapshot.exists():
            shutil.rmtree(snapshot)
        for name, data in files.items():
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_bytes(data)
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(sha)
        self.commits.append((repo_id, commit_message, sorted(op.path_in_repo for op in operations)))
        url = f"https://huggingface.co/{repo_id}/commit/{sha}"
        return CommitInfo(commit_url=url, commit_message=commit_message, commit_description="", oid=sha)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path) -> FakeHub:
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(
        HfApi, "create_branch", lambda api, repo_id, **kw: hub.create_branch(api, repo_id, **kw)
    )
    monkeypatch.setattr(
        HfApi,
        "create_commit",
        lambda api, repo_id, operations, **kw: hub.create_commit(api, repo_id, operations, **kw),
    )
    monkeypatch.setattr(
        HfApi, "_validate_yaml", lambda api, content, **kw: hub.validate_yaml(api, content, **kw)
    )
    return hub
