"""Static guarantees over the package sources: nothing that loads files can unpickle or run their code.

Every ``torch.load`` passes ``weights_only=True``; no ``pickle``/``dill``/``joblib``/``cloudpickle``
load, no ``np.load(..., allow_pickle=True)``, and ``trust_remote_code`` is never set to anything but
False. (The behaviour is tested on planted files in the ``test_reliability_untrusted.py`` files.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tokenizers_mm", "ar_model", "pipelines", "data", "benchmarks")
UNPICKLERS = {"pickle", "dill", "joblib", "cloudpickle", "_pickle"}


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def violations(source: str, name: str = "<string>") -> list[str]:
    """Unsafe loading calls in ``source``, as ``name:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            attr = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = (
                func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            )
            where = f"{name}:{node.lineno}"
            if owner == "torch" and attr == "load" and not _is_const(_kw(node, "weights_only"), True):
                found.append(f"{where}: torch.load without weights_only=True")
            if owner in UNPICKLERS and attr in ("load", "loads", "Unpickler"):
                found.append(f"{where}: {owner}.{attr}")
            if (
                owner in ("np", "numpy")
                and attr == "load"
                and not _is_const(_kw(node, "allow_pickle"), False)
            ):
                found.append(f"{where}: np.load without allow_pickle=False")
            trc = _kw(node, "trust_remote_code")
            if trc is not None and not _is_const(trc, False):
                found.append(f"{where}: trust_remote_code is not False")
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if (
                    _is_const(key, None)
                    or not isinstance(key, ast.Constant)
                    or key.value != "trust_remote_code"
                ):
                    continue
                if not _is_const(value, False):
                    found.append(f"{name}:{key.lineno}: trust_remote_code is not False")
    return found


def test_package_sources_never_unpickle_or_trust_remote_code():
    sources = _sources()
    assert len(sources) > 50  # the scan sees the packages
    found = [v for p in sources for v in violations(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


@pytest.mark.parametrize(
    "bad",
    [
        "torch.load(f)",
        "torch.load(f, weights_only=False)",
        "pickle.loads(b)",
        "np.load(f, allow_pickle=True)",
        "np.load(f)",
        "AutoModel.from_pretrained(p, trust_remote_code=True)",
        "AutoModel.from_pretrained(p, **{'trust_remote_code': flag})",
    ],
)
def test_the_scan_catches_unsafe_calls(bad):
    assert violations(bad)
    assert not violations("torch.load(f, weights_only=True); np.load(f, allow_pickle=False)")
